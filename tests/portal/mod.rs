//! The portal: its SQL contract here; its web server and browser tests beside it.

mod browser;
mod http;
mod sql;
