//! Integration tests: the real sockhold binary, real sockets, real processes. One test binary,
//! a module per area.

mod accept;
mod adopt;
mod child;
mod control;
mod docs;
mod exit_codes;
mod faults;
mod fd_store;
mod hostile;
mod lifecycle;
mod load;
mod metrics;
mod pid1;
mod quic;
mod readiness;
mod real_servers;
mod sockets;
mod steer;
mod support;
mod units;
mod upgrade;
mod world;
