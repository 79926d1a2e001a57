//! Placeholder: the simulated-network test of the driver (being written).
