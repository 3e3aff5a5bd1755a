# Every `section.key` that the docs, README, job scripts, example decks and the core's messages name is a
# key of core/deck/config_keys.c (tests/cli/keys_test.sh). Needs no build.
add_test(NAME keys COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/keys_test.sh ${PROJECT_SOURCE_DIR})
set_tests_properties(keys PROPERTIES TIMEOUT 60 LABELS "docs;cli")
