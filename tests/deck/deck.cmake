# The deck parser and configuration registry (core/deck/config.c, config_print.c, deck.c), and plugin
# settings (plugin_settings.c).
dsmoe_test(test_deck SOURCES ${DSMOE_TEST_DIR}/deck/test_deck.c TIMEOUT 30 LABELS config)
dsmoe_test(test_deck_text SOURCES ${DSMOE_TEST_DIR}/deck/test_deck_text.c TIMEOUT 30 LABELS config)
dsmoe_test(test_plugin_settings SOURCES ${DSMOE_TEST_DIR}/deck/test_plugin_settings.c TIMEOUT 30 LABELS config)
