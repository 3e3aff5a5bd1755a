# Whole-model gradients and the training driver (through the real cpu and mpi plugins).
dsmoe_test(test_model SOURCES ${DSMOE_TEST_DIR}/model/test_model.c TIMEOUT 300)
add_dependencies(test_model dsmoe_kernel_cpu dsmoe_comm_mpi)
dsmoe_test(test_train SOURCES ${DSMOE_TEST_DIR}/model/test_train.c TIMEOUT 600)
add_dependencies(test_train dsmoe_kernel_cpu dsmoe_comm_mpi)
