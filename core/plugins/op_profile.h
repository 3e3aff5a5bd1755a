// core/plugins/op_profile.h: where the time of a step goes, by plugin call. While a profile records,
// every kernel op the core enqueues through KCALL and every collective through CCOLL (runtime.h) is
// timed on the host from the end of the queue's earlier work to the end of its own: the queue is waited
// before and after the call. So each call's time is its own work, whatever the plugin overlaps, and
// the run is slower than without the profile (nothing overlaps any more). Calls the core makes outside
// those macros, the host's own work and the waits' overhead are the profiled wall time less the sum of
// the calls: the report's "outside the timed calls" line.
// defines: dsmoe_op_profile, dsmoe_prof_site, dsmoe_prof_create, dsmoe_prof_free, dsmoe_prof_record,
//          dsmoe_prof_enter, dsmoe_prof_leave, dsmoe_prof_table, dsmoe_prof_gather, dsmoe_prof_print,
//          dsmoe_prof_write_tsv, DSMOE_PROF_SITE
#ifndef DSMOE_OP_PROFILE_H
#define DSMOE_OP_PROFILE_H
#include <stdio.h>

#include "control.h" // dsmoe_ctl_group
#include "util.h"

// One call site: the plugin member's name, where the core calls it, and which plugin. Sites are static
// constants (DSMOE_PROF_SITE): the profile keys its rows by their address.
typedef struct dsmoe_prof_site {
    const char *op;   // the member's name (gemm_grouped, allreduce)
    const char *file; // __FILE__ of the call
    int line;
    int comm; // 1: a comm plugin collective (CCOLL), 0: a kernel op (KCALL)
} dsmoe_prof_site;

#define DSMOE_PROF_SITE(name, op_name, is_comm)                                                    \
    static const dsmoe_prof_site name = {#op_name, __FILE__, __LINE__, (is_comm)}

typedef struct dsmoe_op_profile dsmoe_op_profile;
struct dsmoe_runtime;

dsmoe_status dsmoe_prof_create(dsmoe_op_profile **p, dsmoe_err *err);
void dsmoe_prof_free(dsmoe_op_profile *p);

// Recording on (1) or off (0). Turning it on waits for the runtime's queue (earlier work is not the
// window's) and starts a window; turning it off waits too and adds the window's wall time to the
// profile. Calls are timed only inside windows; several windows add up (e.g. every training step but
// the first).
dsmoe_status dsmoe_prof_record(const struct dsmoe_runtime *rt, int on, dsmoe_err *err);

// Around one call (KCALL, CCOLL): enter waits for the queue and notes the time; leave waits again and
// adds the time since enter to site's row. Both do nothing unless recording.
dsmoe_status dsmoe_prof_enter(const struct dsmoe_runtime *rt, dsmoe_err *err);
dsmoe_status dsmoe_prof_leave(const struct dsmoe_runtime *rt, const dsmoe_prof_site *site, dsmoe_err *err);

// Totals: the profiled wall time (sum of the windows), the timed calls' sum, and the windows.
typedef struct dsmoe_prof_totals {
    double wall_s, calls_s;
    long windows, calls;
} dsmoe_prof_totals;
dsmoe_prof_totals dsmoe_prof_totals_of(const dsmoe_op_profile *p);

// Every rank's profile, merged by call site (the ranks name a site by member, file and line).
typedef struct dsmoe_prof_table dsmoe_prof_table;

// Collective over g: rank 0 of g gets every member's profile in *out (NULL on the other members; p may
// be NULL on a member that has none: it counts as empty). The caller frees with dsmoe_prof_table_free.
dsmoe_status dsmoe_prof_gather(const dsmoe_op_profile *p, const dsmoe_ctl_group *g, dsmoe_prof_table **out,
                               dsmoe_err *err);
void dsmoe_prof_table_free(dsmoe_prof_table *t);

// The table by member (the sites of one member added up; by_site: a row per call site), largest first,
// at most max_rows rows (0 = all) and the rest summed in one line, then the sum of the calls and the
// time outside them; `title` heads it. Over several ranks a row gives the mean over the ranks, and the
// smallest and largest rank's milliseconds with those ranks (where one rank waits for the others).
void dsmoe_prof_print(const dsmoe_prof_table *t, FILE *out, const char *title, int by_site, int max_rows);

// Every rank's sites as tab-separated values (header: rank kind op site calls total_ms mean_us share),
// each rank's rows largest first by the mean over the ranks, then its wall time and its outside line;
// written atomically (a temporary name, renamed).
dsmoe_status dsmoe_prof_write_tsv(const dsmoe_prof_table *t, const char *path, dsmoe_err *err);

#endif
