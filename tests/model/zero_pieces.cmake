# ZeRO-1's pieced all-gather (core/model/optimizer.c) with pieces of a few elements: the test links its own
# optimizer.c built with a 12-element landing budget (the static library's copy is then not pulled in).
dsmoe_test(test_zero_pieces SOURCES ${DSMOE_TEST_DIR}/model/test_zero_pieces.c ${PROJECT_SOURCE_DIR}/core/model/optimizer.c
           RANKS 4 TIMEOUT 60)
target_compile_definitions(test_zero_pieces PRIVATE DSMOE_ZERO_GATHER_ELEMS=12)
