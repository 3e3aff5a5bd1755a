# The deck parser and configuration registry (core/deck/config.c, config_print.c, deck.c).
dsmoe_test(test_deck SOURCES test_deck.c TIMEOUT 30 LABELS config)
