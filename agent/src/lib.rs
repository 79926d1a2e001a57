//! The overlay host agent.
