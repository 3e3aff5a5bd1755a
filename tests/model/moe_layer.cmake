# The MoE layer (core/model/moe_layer.c) through the cpu kernel and mpi comm plugins loaded from the build
# tree: naive reference and finite differences on 1 rank, bfloat16 against float32 on the same values
# (tests/model/test_moe_layer.c); expert parallelism (ep = ranks), both l_aux scopes and both all-to-alls
# on 2 and 4, in float32 and bfloat16 (tests/model/test_moe_layer_ep.c).
dsmoe_test(test_moe_layer_np1 SOURCES ${DSMOE_TEST_DIR}/model/test_moe_layer.c
           ${DSMOE_TEST_DIR}/model/moe_layer_testutil.c RANKS 1 TIMEOUT 60 LIBS m LABELS moe)
foreach(ranks 2 4)
  dsmoe_test(test_moe_layer_np${ranks} SOURCES ${DSMOE_TEST_DIR}/model/test_moe_layer_ep.c
             ${DSMOE_TEST_DIR}/model/moe_layer_testutil.c RANKS ${ranks} TIMEOUT 60 LIBS m LABELS moe)
endforeach()
foreach(ranks 1 2 4)
  add_dependencies(test_moe_layer_np${ranks} dsmoe_kernel_cpu dsmoe_comm_mpi)
endforeach()
