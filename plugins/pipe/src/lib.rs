//! pipe transport plugin (in progress)
