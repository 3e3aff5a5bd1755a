# Damaged checkpoints are refused, naming the file and the tensor or field; checkpoint.resume = auto skips a
# damaged newest file; stale temporaries are removed (tests/cli/ckpt_damage_test.sh, core/io/checkpoint.c).
add_test(NAME ckpt_damage COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/ckpt_damage_test.sh $<TARGET_FILE:dsmoe>)
set_tests_properties(ckpt_damage PROPERTIES TIMEOUT 120 LABELS "cli;checkpoint")
