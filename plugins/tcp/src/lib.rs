//! tcp transport plugin (in progress)
