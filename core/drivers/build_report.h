// core/drivers/build_report.h: `dsmoe --config`: how this dsmoe was built and what it finds where it runs.
// defines: dsmoe_build_report
//
// In the spirit of ompi_info: the compiler and flags, the MPI library (the one compiled against and the
// one loaded), hwloc, the CUDA toolkit and NCCL the build found, the plugin search path, and for every
// plugin on it the file, what its table declares (ABI version, memory kinds, dtypes, capabilities,
// settings, description) and the versions of the libraries it loaded (BLAS, oneDNN, CUDA runtime,
// cuBLAS, NCCL), or the loader's reason for refusing it. Runs before MPI_Init (no launcher needed).
#ifndef DSMOE_BUILD_REPORT_H
#define DSMOE_BUILD_REPORT_H
#include <stdio.h>

// Prints the report on out. Returns the exit status for main: 0 (a refused plugin is reported, not an
// error: the report is how a site finds out why).
int dsmoe_build_report(FILE *out);

#endif
