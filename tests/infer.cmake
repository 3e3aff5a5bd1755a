# The KV-cache inference forward against the full forward (core/model/model_infer.c), through the real
# cpu and mpi plugins.
dsmoe_test(test_infer SOURCES test_infer.c TIMEOUT 120 LABELS "inference")
add_dependencies(test_infer dsmoe_kernel_cpu dsmoe_comm_mpi)
