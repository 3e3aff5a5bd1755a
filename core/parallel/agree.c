// core/parallel/agree.c: dsmoe_errors_agree (util.h): turning per-rank failures into one decision.
#include <mpi.h>

#include "util.h"

dsmoe_status dsmoe_errors_agree(dsmoe_status status, dsmoe_err *err) {
    // A rank that only learnt of another's failure (PEER) is not a new failure: agreeing twice on the
    // same error keeps its scope.
    int size, failed = status != DSMOE_OK && err->scope != DSMOE_SCOPE_PEER, count = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Allreduce(&failed, &count, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (count == 0) return status;
    if (count == size) {
        err->scope = DSMOE_SCOPE_COLLECTIVE;
        return status;
    }
    if (status != DSMOE_OK) return status;
    dsmoe_err_set(err, DSMOE_ERR_INTERNAL, "%d other rank(s) failed; their message ends the job", count);
    err->scope = DSMOE_SCOPE_PEER;
    return DSMOE_ERR_INTERNAL;
}
