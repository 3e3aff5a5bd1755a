# Topology, binding, GPU choice and expert placement (core/parallel/topology.c, core/parallel/placement.c) on described
# nodes: hwloc synthetic descriptions and inputs/topologies/test-4gpu.xml (fake GPUs). No real binding.
dsmoe_test(test_topology SOURCES ${DSMOE_TEST_DIR}/parallel/test_topology.c TIMEOUT 60)
dsmoe_test(test_placement SOURCES ${DSMOE_TEST_DIR}/parallel/test_placement.c RANKS 4 TIMEOUT 60)
