# The byte and GPT-2 BPE tokenizers (core/io/tokenizer.c): hand-worked merges on a small vocab.json /
# merges.txt, GPT-2's pre-tokenisation, round trips, every error of the files. The real GPT-2 files are
# used when DSMOE_GPT2_DIR names a directory holding them (skipped otherwise).
dsmoe_test(test_tokenizer SOURCES ${DSMOE_TEST_DIR}/io/test_tokenizer.c TIMEOUT 60 LABELS text)
