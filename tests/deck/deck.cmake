# The deck parser and configuration registry (core/deck/config.c, config_print.c, deck.c).
dsmoe_test(test_deck SOURCES ${DSMOE_TEST_DIR}/deck/test_deck.c TIMEOUT 30 LABELS config)
dsmoe_test(test_deck_text SOURCES ${DSMOE_TEST_DIR}/deck/test_deck_text.c TIMEOUT 30 LABELS config)
