//! Helpers shared by the end-to-end tests: locating the built binaries and
//! running `vmm` with a plugin under a deadline.
