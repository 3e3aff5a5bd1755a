// core/main.c: the dsmoe command: `dsmoe [--check] input.deck [key=value ...]`.
// Rank 0 reads the deck and broadcasts it; every rank resolves the same configuration. Errors that all
// ranks reach together (deck, checkpoint, data) print once from rank 0; an error on one rank prints
// with its rank and aborts every rank, so a job never hangs.
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mpi.h>

#include "config.h"        // dsmoe_config_load_text, dsmoe_config_print
#include "plugin_loader.h" // dsmoe_plugin_load_*, dsmoe_plugin_search_path
#include "runtime.h"       // dsmoe_runtime_open, dsmoe_runtime_close
#include "train.h"         // dsmoe_train_run

#ifndef DSMOE_VERSION
#define DSMOE_VERSION "unknown"
#endif

static void usage(FILE *out) {
    fprintf(out,
            "usage: dsmoe [--check] DECK [key=value ...]\n"
            "       dsmoe --help [keys]\n"
            "       dsmoe --version\n"
            "\n"
            "  DECK            input deck: model, MoE, parallelism, backends, data, training (docs/deck.md)\n"
            "  key=value       override a deck key, e.g. train.steps=200 (beats DSMOE_TRAIN_STEPS and the deck)\n"
            "  --check         validate the deck and the plugins it names, print the resolved configuration, exit\n"
            "  --help keys     list every deck key with its type, default and meaning\n"
            "  --version       print the version, plugin ABI versions and the plugin search path\n"
            "\n"
            "Launch with srun, mpiexec, or as a single process.\n");
}

static void print_version(void) {
    char path[8192];
    dsmoe_plugin_search_path("", path, sizeof path);
    printf("dsmoe %s\n", DSMOE_VERSION);
    printf("kernel plugin ABI %d (symbol %s)\n", DSMOE_KERNEL_API_VERSION, DSMOE_KERNEL_PLUGIN_SYMBOL);
    printf("comm plugin ABI %d (symbol %s)\n", DSMOE_COMM_API_VERSION, DSMOE_COMM_PLUGIN_SYMBOL);
    printf("plugin search path: %s\n", path);
    char mpi[MPI_MAX_LIBRARY_VERSION_STRING];
    int len;
    MPI_Get_library_version(mpi, &len);
    char *nl = strchr(mpi, '\n');
    if (nl) *nl = '\0';
    printf("MPI: %s\n", mpi);
}

// Rank 0 reads the file; everyone gets the text or rank 0's error.
static dsmoe_status read_deck(const char *path, int rank, char **text, dsmoe_err *err) {
    long len = -1;
    char *buf = NULL;
    if (rank == 0) {
        FILE *f = fopen(path, "rb");
        if (!f) {
            dsmoe_err_set(err, DSMOE_ERR_IO, "cannot open deck '%s': %s", path, strerror(errno));
        } else {
            fseek(f, 0, SEEK_END);
            len = ftell(f);
            fseek(f, 0, SEEK_SET);
            buf = malloc((size_t)len + 1);
            if (!buf || fread(buf, 1, (size_t)len, f) != (size_t)len) {
                dsmoe_err_set(err, DSMOE_ERR_IO, "cannot read deck '%s'", path);
                len = -1;
            }
            fclose(f);
        }
    }
    MPI_Bcast(&len, 1, MPI_LONG, 0, MPI_COMM_WORLD);
    if (len < 0) {
        free(buf);
        MPI_Bcast(err->msg, (int)sizeof err->msg, MPI_CHAR, 0, MPI_COMM_WORLD);
        return err->status = DSMOE_ERR_IO;
    }
    if (rank != 0) buf = malloc((size_t)len + 1);
    MPI_Bcast(buf, (int)len, MPI_CHAR, 0, MPI_COMM_WORLD);
    buf[len] = '\0';
    *text = buf;
    return DSMOE_OK;
}

// What the batch system says about this job, so a log shows where it ran.
static void print_launcher(int world_size) {
    const char *slurm_job = getenv("SLURM_JOB_ID"), *pbs_job = getenv("PBS_JOBID");
    int len;
    char host[MPI_MAX_PROCESSOR_NAME];
    MPI_Get_processor_name(host, &len);
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    int node_size, node_rank, nodes, is_leader;
    MPI_Comm_size(node, &node_size);
    MPI_Comm_rank(node, &node_rank);
    is_leader = node_rank == 0;
    MPI_Allreduce(&is_leader, &nodes, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Comm_free(&node);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank != 0) return;
    printf("dsmoe %s: %d rank%s on %d node%s (%d on %s)", DSMOE_VERSION, world_size, world_size == 1 ? "" : "s",
           nodes, nodes == 1 ? "" : "s", node_size, host);
    if (slurm_job)
        printf(", Slurm job %s step %s, %s tasks per node", slurm_job,
               getenv("SLURM_STEP_ID") ? getenv("SLURM_STEP_ID") : "?",
               getenv("SLURM_NTASKS_PER_NODE") ? getenv("SLURM_NTASKS_PER_NODE")
                                                : getenv("SLURM_TASKS_PER_NODE") ? getenv("SLURM_TASKS_PER_NODE") : "?");
    else if (pbs_job)
        printf(", PBS job %s", pbs_job);
    else if (getenv("OMPI_COMM_WORLD_SIZE"))
        printf(", launched by mpiexec");
    else
        printf(", singleton");
    printf("\n");
}

// A failure all ranks share prints once; one that only some ranks hit aborts the job.
static int finish(dsmoe_status s, const dsmoe_err *err, int rank, int world_size) {
    int failed = s != DSMOE_OK, count = 0;
    MPI_Allreduce(&failed, &count, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (count == 0) {
        MPI_Finalize();
        return 0;
    }
    if (count == world_size) {
        if (rank == 0) fprintf(stderr, "dsmoe: error: %s\n", err->msg);
        MPI_Finalize();
        return 1;
    }
    if (failed) fprintf(stderr, "dsmoe: error on rank %d: %s\n", rank, err->msg);
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
}

int main(int argc, char **argv) {
    int check_only = 0, argi = 1;
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        if (argc >= 3 && strcmp(argv[2], "keys") == 0) dsmoe_config_print_keys(stdout);
        else usage(stdout);
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--version") == 0) {
        print_version();
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--check") == 0) {
        check_only = 1;
        argi++;
    }
    if (argi >= argc || argv[argi][0] == '-') {
        if (argi < argc) fprintf(stderr, "dsmoe: unknown option '%s'\n", argv[argi]);
        usage(stderr);
        return 2;
    }
    const char *deck_path = argv[argi];
    char *const *overrides = argv + argi + 1;
    int n_overrides = argc - argi - 1;

    MPI_Init(&argc, &argv);
    int rank, world_size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    // A one-rank failure must end the job, not leave others waiting in a collective.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);

    dsmoe_err err = {0};
    char *deck_text = NULL, *resolved = NULL;
    dsmoe_config cfg;
    dsmoe_config_sources *sources = NULL;
    dsmoe_status s = read_deck(deck_path, rank, &deck_text, &err);
    if (s == DSMOE_OK)
        s = dsmoe_config_load_text(deck_text, deck_path, overrides, n_overrides, NULL, world_size, &cfg, &sources, &err);
    if (s != DSMOE_OK) {
        if (rank == 0) fprintf(stderr, "dsmoe: error: %s\n", err.msg);
        free(deck_text);
        MPI_Finalize();
        return 1;
    }
    print_launcher(world_size);
    resolved = dsmoe_config_to_text(&cfg, sources);
    if (rank == 0) {
        printf("---- resolved configuration (deck %s) ----\n", deck_path);
        dsmoe_config_print(stdout, &cfg, sources);
        printf("----\n");
        fflush(stdout);
    }

    dsmoe_runtime rt;
    memset(&rt, 0, sizeof rt);
    s = dsmoe_runtime_open(cfg.kernel_backend, cfg.comm_backend, cfg.plugin_path, cfg.threads, &rt, &err);
    if (s == DSMOE_OK && rank == 0)
        printf("backends: kernel %s (%s: %s), comm %s (%s)\n", rt.kern->name, rt.kernel_handle.path,
               rt.kern->describe(rt.kctx), rt.comm->name, rt.comm_handle.path);
    if (s == DSMOE_OK && check_only) {
        if (rank == 0) printf("deck %s is valid\n", deck_path);
    } else if (s == DSMOE_OK) {
        dsmoe_train_result result;
        memset(&result, 0, sizeof result);
        s = dsmoe_train_run(&cfg, resolved, &rt, &result, &err);
    }
    dsmoe_runtime_close(&rt);
    dsmoe_config_sources_free(sources);
    free(resolved);
    free(deck_text);
    return finish(s, &err, rank, world_size);
}
