# The deck parser and configuration registry (core/deck/config.c, core/deck/deck.c).
dsmoe_test(test_deck SOURCES test_deck.c TIMEOUT 30 LABELS config)
