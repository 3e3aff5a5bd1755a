# One training run per directory: the lock files of core/io/run_lock.c.
dsmoe_test(test_run_lock SOURCES ${DSMOE_TEST_DIR}/io/test_run_lock.c TIMEOUT 30)
