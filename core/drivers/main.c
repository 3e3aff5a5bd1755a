// core/drivers/main.c: the dsmoe command: `dsmoe [--check] input.deck [key=value ...]`.
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

#include "build_report.h"  // dsmoe_build_report (--config)
#include "config.h"        // dsmoe_config_load_text, dsmoe_config_print
#include "generate.h"      // dsmoe_generate_run
#include "placement.h"     // dsmoe_placement_create, dsmoe_placement_print
#include "plan.h"          // dsmoe_plan_run
#include "plugin_loader.h" // dsmoe_plugin_load_*, dsmoe_plugin_search_path
#include "runtime.h"       // dsmoe_runtime_open, dsmoe_runtime_close
#include "signals.h"       // dsmoe_signals_install, dsmoe_signals_parse
#include "train.h"         // dsmoe_train_run
#include "watchdog.h"      // dsmoe_watchdog_start (run.watchdog)

#ifndef DSMOE_VERSION
#define DSMOE_VERSION "unknown"
#endif

static void usage(FILE *out) {
    fprintf(out,
            "usage: dsmoe [--check] DECK [key=value ...]\n"
            "       dsmoe --plan DECK [key=value ...]\n"
            "       dsmoe --help [keys]\n"
            "       dsmoe --version\n"
            "       dsmoe --config\n"
            "\n"
            "  DECK            input deck: model, MoE, parallelism, backends, data, training (docs/deck.md)\n"
            "  key=value       override a deck key, e.g. train.steps=200 (beats DSMOE_TRAIN_STEPS and the deck)\n"
            "  --check         validate the deck and the plugins it names, print the resolved configuration, exit\n"
            "  --plan          no training, no MPI: for plan.nodes nodes like plan.topology, print the groups, the\n"
            "                  placement, memory per rank and all-to-all traffic; exit 1 if it does not fit\n"
            "  --help keys     list every deck key with its type, default and meaning\n"
            "  --version       print the version, plugin ABI versions and the plugin search path\n"
            "  --config        print how dsmoe was built (compiler, MPI, hwloc, CUDA) and every plugin found\n"
            "\n"
            "Launch with srun, mpiexec, or as a single process.\n"
            "\n"
            "Exit codes: 0 done; 1 error; 2 bad command line; 70 run.watchdog: a rank made no progress (a peer\n"
            "stopped or hung); 73 metrics file not written; 74 checkpoint saves failed; 75 stopped by a\n"
            "run.signals signal (default USR1, TERM) after writing a checkpoint: requeue with\n"
            "checkpoint.resume=auto; 76 a second signal ended it at once (docs/parallel.md).\n");
}

static void print_version(void) {
    char path[8192];
    dsmoe_plugin_search_path("", path, sizeof path);
    printf("dsmoe %s\n", DSMOE_VERSION);
    printf("kernel plugin ABI %d (symbol %s; ABI 2 and 1 through adapters)\n", DSMOE_KERNEL_API_VERSION,
           DSMOE_KERNEL_PLUGIN_SYMBOL);
    printf("comm plugin ABI %d (symbol %s; ABI 1 through an adapter)\n", DSMOE_COMM_API_VERSION,
           DSMOE_COMM_PLUGIN_SYMBOL);
    printf("plugin search path: %s\n", path);
    char mpi[MPI_MAX_LIBRARY_VERSION_STRING];
    int len;
    MPI_Get_library_version(mpi, &len);
    char *nl = strchr(mpi, '\n');
    if (nl) *nl = '\0';
    printf("MPI: %s\n", mpi);
}

// The plugins' resolved settings after the core's keys, so that the resolved deck stays complete.
static char *append_plugin_settings(char *resolved, const dsmoe_runtime *rt) {
    char *k = dsmoe_plugin_values_text(&rt->kernel_settings), *c = dsmoe_plugin_values_text(&rt->comm_settings);
    char *all = NULL;
    if (resolved && k && c && asprintf(&all, "%s%s%s", resolved, k, c) >= 0) {
        free(resolved);
        resolved = all;
    }
    free(k);
    free(c);
    return resolved;
}

static void print_plugin_settings(const dsmoe_runtime *rt) {
    const dsmoe_plugin_values *v[2] = {&rt->kernel_settings, &rt->comm_settings};
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < v[j]->n; i++)
            printf("setting: %s.%s.%s = %s (%s)\n", v[j]->kind, v[j]->plugin, v[j]->params[i].name, v[j]->values[i],
                   v[j]->origin[i]);
}

// --help keys, second part: the settings of every plugin on the search path ([kernel.NAME], [comm.NAME]).
static void print_plugin_keys(void) {
    printf("\nPlugin settings (docs/deck.md): in a [kernel.NAME] or [comm.NAME] section, as\n"
           "DSMOE_KERNEL_<NAME>_<KEY> / DSMOE_COMM_<NAME>_<KEY>, or as kernel.NAME.key=value. The plugins on the\n"
           "search path:\n");
    static const char *const kinds[2] = {"kernel", "comm"};
    static const char *const types[] = {"int", "float", "bool", "string", "enum"};
    for (int j = 0; j < 2; j++) {
        char names[64][64];
        int n = dsmoe_plugin_list(kinds[j], "", names, 64);
        for (int i = 0; i < n; i++) {
            dsmoe_plugin_handle h;
            memset(&h, 0, sizeof h);
            dsmoe_err err = {0};
            const dsmoe_param_decl *params = NULL;
            int np = 0;
            const dsmoe_kernel_plugin_v3 *k = NULL;
            const dsmoe_comm_plugin_v2 *c = NULL;
            dsmoe_status s = j == 0 ? dsmoe_plugin_load_kernel(names[i], "", &k, &h, &err)
                                    : dsmoe_plugin_load_comm(names[i], "", &c, &h, &err);
            printf("\n[%s.%s]", kinds[j], names[i]);
            if (s != DSMOE_OK) {
                printf("   (does not load here: %s)\n", err.msg);
                continue;
            }
            params = k ? k->params : c->params;
            np = k ? k->n_params : c->n_params;
            printf("   (%s)%s\n", h.path, np == 0 ? ": no settings" : "");
            for (int p = 0; p < np; p++) {
                unsigned t = (unsigned)params[p].type;
                printf("  %s.%s.%s = %s   (%s%s%s)\n      %s\n", kinds[j], names[i], params[p].name,
                       params[p].default_value, t < 5 ? types[t] : "?", params[p].choices ? ": " : "",
                       params[p].choices ? params[p].choices : "", params[p].help);
            }
            dsmoe_plugin_unload(&h);
        }
    }
}

// Rank 0 reads the file; everyone gets the text or rank 0's error.
static dsmoe_status read_deck(const char *path, int rank, char **text, dsmoe_err *err) {
    long long hdr[2] = {0, DSMOE_OK}; // rank 0's {bytes, status}
    char *buf = NULL;
    if (rank == 0) {
        size_t n = 0;
        hdr[1] = dsmoe_deck_read_file(path, &buf, &n, err); // to EOF (pipes too), NUL-free UTF-8, <= 64 MiB
        hdr[0] = (long long)n;
    }
    MPI_Bcast(hdr, 2, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    if (hdr[1] != DSMOE_OK) {
        free(buf);
        MPI_Bcast(err->msg, (int)sizeof err->msg, MPI_CHAR, 0, MPI_COMM_WORLD);
        return err->status = (dsmoe_status)hdr[1];
    }
    if (rank != 0 && !(buf = malloc((size_t)hdr[0] + 1)))
        return dsmoe_err_set(err, DSMOE_ERR_NOMEM, "out of memory for the deck (%lld bytes)", hdr[0]);
    MPI_Bcast(buf, (int)hdr[0], MPI_CHAR, 0, MPI_COMM_WORLD); // at most 64 MiB: fits an int
    buf[hdr[0]] = '\0';
    *text = buf;
    return DSMOE_OK;
}

// What the batch system says about this job, so a log shows where it ran. Placement (ranks, nodes,
// ranks per node) comes from MPI through the placement; the launcher and job come from the environment it sets: Open MPI's
// mpiexec (OMPI_MCA_orte_hnp_uri in 4.x, PRTE_LAUNCHED in 5.x; a singleton has neither), MPICH/Intel
// hydra (PMI_RANK), srun (SLURM_STEP_ID with SLURM_PROCID), PBS Pro / Torque (PBS_JOBID, PBS_NODEFILE).
// Rank 0 prints.
static void print_launcher(const dsmoe_placement *pl) {
    if (pl->world_rank != 0) return;
    int world_size = pl->world_size, nodes = pl->nodes;
    const char *slurm_job = getenv("SLURM_JOB_ID"), *slurm_step = getenv("SLURM_STEP_ID");
    const char *pbs_job = getenv("PBS_JOBID"), *launcher = "singleton (no launcher)";
    if (getenv("OMPI_MCA_orte_hnp_uri") || getenv("PRTE_LAUNCHED")) launcher = "launched by mpiexec (Open MPI)";
    else if (getenv("PMI_RANK") && !getenv("SLURM_PROCID")) launcher = "launched by mpiexec (hydra)";
    else if (slurm_step && getenv("SLURM_PROCID")) launcher = "launched by srun";
    printf("dsmoe %s: %d rank%s on %d node%s (", DSMOE_VERSION, world_size, world_size == 1 ? "" : "s", nodes,
           nodes == 1 ? "" : "s");
    if (pl->min_node_ranks == pl->max_node_ranks) printf("%d per node", pl->max_node_ranks);
    else printf("%d-%d per node", pl->min_node_ranks, pl->max_node_ranks);
    printf("; rank 0 on %s), %s", pl->me.host, launcher);

    if (slurm_job) {
        // In a step (srun, or the step mpiexec's daemons run in) the step's counts; in the batch
        // script itself the job's.
        const char *nn = getenv(slurm_step ? "SLURM_STEP_NUM_NODES" : "SLURM_JOB_NUM_NODES");
        const char *tpn = getenv(slurm_step ? "SLURM_STEP_TASKS_PER_NODE" : "SLURM_TASKS_PER_NODE");
        const char *cpt = getenv("SLURM_CPUS_PER_TASK");
        printf(": Slurm job %s", slurm_job);
        if (slurm_step) printf(" step %s", slurm_step);
        if (nn) printf(", %s node%s", nn, strcmp(nn, "1") == 0 ? "" : "s");
        if (tpn) printf(", tasks per node %s", tpn);
        if (cpt) printf(", %s CPUs per task", cpt);
    } else if (pbs_job) {
        // PBS_NODEFILE: one line per MPI slot (select ... mpiprocs=N repeats a host N times).
        const char *nodefile = getenv("PBS_NODEFILE"), *ncpus = getenv("NCPUS");
        printf(": PBS job %s", pbs_job);
        FILE *f = nodefile ? fopen(nodefile, "r") : NULL;
        if (f) {
            char line[256], prev[256] = "";
            int slots = 0, hosts = 0; // hosts counts changes between lines: PBS lists a host's slots together
            while (fgets(line, sizeof line, f)) {
                line[strcspn(line, " \t\r\n")] = '\0';
                if (!line[0]) continue;
                slots++;
                if (strcmp(line, prev) != 0) hosts++;
                snprintf(prev, sizeof prev, "%s", line);
            }
            fclose(f);
            printf(", %d node%s and %d slot%s in PBS_NODEFILE", hosts, hosts == 1 ? "" : "s", slots,
                   slots == 1 ? "" : "s");
        } else if (nodefile) {
            printf(", PBS_NODEFILE %s unreadable", nodefile);
        }
        if (ncpus) printf(", NCPUS %s", ncpus);
    }
    printf("\n");
    fflush(stdout);
    // srun without PMIx starts N singletons that each train alone and write the same files.
    const char *step_tasks = getenv("SLURM_STEP_NUM_TASKS");
    if (strcmp(launcher, "launched by srun") == 0 && step_tasks && atoi(step_tasks) != world_size)
        fprintf(stderr, "dsmoe: warning: srun started %s tasks but MPI sees %d rank%s: launch with srun --mpi=pmix\n",
                step_tasks, world_size, world_size == 1 ? "" : "s");
}

// A failure all ranks share prints once; one that only some ranks hit prints there and ends every rank
// (MPI_Abort), so no rank is left waiting in a collective.
static int finish(dsmoe_status s, const dsmoe_err *err, int rank, int world_size) {
    if (s == DSMOE_OK) {
        MPI_Finalize();
        return 0;
    }
    if (err->scope == DSMOE_SCOPE_COLLECTIVE || world_size == 1) {
        if (rank == 0) fprintf(stderr, "dsmoe: error: %s\n", err->msg);
        MPI_Finalize();
        return 1;
    }
    if (err->scope == DSMOE_SCOPE_PEER) {
        // The failing rank prints and aborts the job; wait for that rather than racing its message.
        MPI_Barrier(MPI_COMM_WORLD);
    } else {
        fprintf(stderr, "dsmoe: error on rank %d of %d: %s\n", rank, world_size, err->msg);
        fflush(stderr);
    }
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
}

int main(int argc, char **argv) {
    int check_only = 0, argi = 1;
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        if (argc >= 3 && strcmp(argv[2], "keys") == 0) {
            dsmoe_config_print_keys(stdout);
            print_plugin_keys();
        }
        else usage(stdout);
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--version") == 0) {
        print_version();
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--config") == 0) return dsmoe_build_report(stdout);
    if (argc >= 3 && strcmp(argv[1], "--plan") == 0) {
        dsmoe_err err = {0};
        dsmoe_status s = dsmoe_plan_run(argv[2], argv + 3, argc - 3, stdout, &err);
        fflush(stdout);
        if (s != DSMOE_OK) fprintf(stderr, "dsmoe: error: %s\n", err.msg);
        return s == DSMOE_OK ? 0 : 1;
    }
    if (argc == 2 && strcmp(argv[1], "--plan") == 0) {
        fprintf(stderr, "dsmoe: --plan needs a deck: dsmoe --plan DECK [key=value ...]\n");
        return 2;
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
        s = dsmoe_config_load_text(deck_text, strcmp(deck_path, "-") ? deck_path : "<stdin>", overrides, n_overrides,
                                   NULL, world_size, &cfg, &sources, &err);
    if (s != DSMOE_OK) {
        if (rank == 0) fprintf(stderr, "dsmoe: error: %s\n", err.msg);
        free(deck_text);
        MPI_Finalize();
        return 1;
    }
    // Walltime signals: from here on a signal is a request to checkpoint, not the end (train.h).
    if ((cfg.mode == DSMOE_MODE_TRAIN || cfg.mode == DSMOE_MODE_GENERATE) && !check_only)
        s = dsmoe_signals_install(&cfg, &err);
    else {
        int signos[16], n;
        s = dsmoe_signals_parse(cfg.signals, signos, 16, &n, &err); // --check refuses a bad name too
    }
    if (s != DSMOE_OK) {
        if (rank == 0) fprintf(stderr, "dsmoe: error: %s\n", err.msg);
        free(deck_text);
        MPI_Finalize();
        return 1;
    }
    // Binding comes before the plugins start their threads (the device choice is made between their
    // loading and init, in dsmoe_runtime_open_placed).
    dsmoe_placement *pl = NULL;
    s = dsmoe_placement_create(&cfg, &pl, &err);
    if (s == DSMOE_OK) print_launcher(pl);
    resolved = dsmoe_config_to_text(&cfg, sources);
    if (rank == 0) {
        printf("---- resolved configuration (deck %s) ----\n", deck_path);
        dsmoe_config_print(stdout, &cfg, sources);
        printf("----\n");
        fflush(stdout);
    }

    dsmoe_runtime rt;
    memset(&rt, 0, sizeof rt);
    if (s == DSMOE_OK)
        s = dsmoe_runtime_open_placed(cfg.kernel_backend, cfg.comm_backend, cfg.plugin_path, cfg.threads, &cfg, pl, &rt,
                                      &err);
    if (s != DSMOE_OK) { // say where the backend was chosen
        const char *key = strncmp(err.msg, "kernel plugin", 13) == 0 ? "run.kernel_backend"
                          : strncmp(err.msg, "comm plugin", 11) == 0   ? "run.comm_backend"
                                                                       : NULL;
        char from[1200];
        if (key) {
            dsmoe_config_source_of(sources, key, from, sizeof from);
            size_t len = strlen(err.msg);
            snprintf(err.msg + len, sizeof err.msg - len, " (%s = %s, from %s)", key,
                     key[4] == 'k' ? cfg.kernel_backend : cfg.comm_backend, from);
        }
    }
    if (s == DSMOE_OK) resolved = append_plugin_settings(resolved, &rt);
    if (s == DSMOE_OK && rank == 0) {
        printf("backends: kernel %s (%s: %s), comm %s (%s%s%s)\n", rt.kern->name, rt.kernel_handle.path,
               rt.kern->describe(rt.kctx), rt.comm->name, rt.comm_handle.path,
               rt.comm_staged ? "; collectives through pinned host staging" : "",
               rt.comm_ordered ? "; float sums in the core's fixed rank order (run.fixed_order_sums)" : "");
        print_plugin_settings(&rt);
        dsmoe_placement_print(stdout, pl, &cfg);
    }
    int stopped = 0, save_failed = 0, metrics_failed = 0;
    if (s == DSMOE_OK && check_only) {
        s = cfg.mode == DSMOE_MODE_GENERATE ? dsmoe_generate_check(&cfg, &rt, &err) : dsmoe_train_check(&cfg, &rt, &err);
        if (s == DSMOE_OK && rank == 0) printf("deck %s is valid\n", deck_path);
    } else if (s == DSMOE_OK && (s = dsmoe_watchdog_start(cfg.watchdog, rank, &err)) != DSMOE_OK) {
        // no thread, no run
    } else if (s == DSMOE_OK && cfg.mode == DSMOE_MODE_GENERATE) {
        int signo = 0;
        s = dsmoe_generate_run(&cfg, resolved, &rt, &signo, &err);
        stopped = signo != 0;
    } else if (s == DSMOE_OK) {
        dsmoe_train_result result;
        memset(&result, 0, sizeof result);
        s = dsmoe_train_run(&cfg, resolved, &rt, &result, &err);
        stopped = result.stopped_signal != 0;
        save_failed = result.save_failed;
        metrics_failed = result.metrics_failed;
    }
    dsmoe_watchdog_stop();
    if (s != DSMOE_OK && err.scope != DSMOE_SCOPE_COLLECTIVE && world_size > 1)
        return finish(s, &err, rank, world_size); // without collective clean-up: other ranks may be mid-step
    dsmoe_runtime_close(&rt);
    dsmoe_placement_free(pl);
    dsmoe_config_sources_free(sources);
    free(resolved);
    free(deck_text);
    int rc = finish(s, &err, rank, world_size);
    // Exit codes: docs/parallel.md "Walltime signals and exit codes" (train.h).
    if (rc != 0) return save_failed ? DSMOE_EXIT_SAVE_FAILED : rc;
    return stopped ? DSMOE_EXIT_SIGNAL_CHECKPOINT : metrics_failed ? DSMOE_EXIT_METRICS_FAILED : 0;
}
