// tests/cuda_emu/emu_check.h: what the emulator's own test programs (test_emu_device.cc,
// test_emu_cublaslt.cc, test_emu_wmma.cc) share: the check macro (a failing condition prints its
// file:line and message and is counted; the program ends with the counts and exit status 1 when any
// failed), and expect_abort_child for the kernel bugs that must stop the run.
#ifndef DSMOE_EMU_CHECK_H
#define DSMOE_EMU_CHECK_H
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

static int failures, checks;
#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        checks++;                                                                                                      \
        if (!(cond)) {                                                                                                 \
            failures++;                                                                                                \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                                \
            printf(__VA_ARGS__);                                                                                       \
            printf("\n");                                                                                              \
        }                                                                                                              \
    } while (0)


// Runs launch() in a forked child with stderr captured; checks that the child aborted (SIGABRT, as the
// emulator does on a kernel bug) and that its stderr holds every one of messages[0 .. n).
template <typename Launch>
static void expect_abort_child(const char *what, Launch launch, const char *const *messages, int n) {
    fflush(stdout);
    int fd[2];
    if (pipe(fd) != 0) { perror("pipe"); exit(1); }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd[1], 2);
        close(fd[0]);
        launch();
        _exit(0);
    }
    close(fd[1]);
    std::string err;
    char b[512];
    for (ssize_t r; (r = read(fd[0], b, sizeof b)) > 0;) err.append(b, (size_t)r);
    close(fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, "%s: the child did not abort (status %d)", what, status);
    for (int i = 0; i < n; i++)
        CHECK(err.find(messages[i]) != std::string::npos, "%s: stderr lacks \"%s\": %s", what, messages[i], err.c_str());
}

#endif
