# scripts/prepare-corpus (docs/data.md, "A real-text corpus") without the network: its Megatron .bin/.idx
# for local files byte for byte against tests/corpus/reference.py, dsmoe reading them back, the POD
# stripper against a hand-written text, and its refusals. Script in tests/corpus/.
add_test(NAME corpus COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/corpus_test.sh $<TARGET_FILE:dsmoe> ${PROJECT_SOURCE_DIR})
set_tests_properties(corpus PROPERTIES TIMEOUT 120 LABELS data SKIP_RETURN_CODE 77)
