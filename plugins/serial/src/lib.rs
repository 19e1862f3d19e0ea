//! serial transport plugin (in progress)
