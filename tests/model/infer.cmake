# The KV-cache inference forward against the full forward (core/model/model_infer.c), through the real
# cpu and mpi plugins.
dsmoe_test(test_infer SOURCES ${DSMOE_TEST_DIR}/model/test_infer.c TIMEOUT 120 LABELS "inference")
add_dependencies(test_infer dsmoe_kernel_cpu dsmoe_comm_mpi)
# What a rank of a tensor group holds in generation (core/model/model_slices.c): the bytes against the
# count from the config, and the logits against the unsliced model's, on 2 ranks.
dsmoe_test(test_infer_slices SOURCES ${DSMOE_TEST_DIR}/model/test_infer_slices.c RANKS 2 TIMEOUT 120 LABELS "inference")
add_dependencies(test_infer_slices dsmoe_kernel_cpu dsmoe_comm_mpi)
