//! Test plugin: asks for the net config and prints it, or the errno.
//! `netcheck` prints `net ip=A.B.C.D mask=A.B.C.D mac=hh:..:hh tap_ok=BOOL`
//! or `net errno=N`.

use std::os::fd::AsRawFd;

use crosvm_plugin::Connection;

fn main() {
    let conn = match Connection::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("netcheck: connect: {e}");
            std::process::exit(1);
        }
    };
    match conn.get_net_config() {
        Ok(cfg) => {
            // The descriptor must be a tap: TUNGETIFF succeeds on it.
            let mut ifr = [0u8; 40];
            // SAFETY: TUNGETIFF writes one struct ifreq (40 bytes) into `ifr`.
            let tap_ok =
                unsafe { libc::ioctl(cfg.tap.as_raw_fd(), libc::TUNGETIFF as _, ifr.as_mut_ptr()) }
                    == 0;
            let mac: Vec<String> = cfg.host_mac.iter().map(|b| format!("{b:02x}")).collect();
            println!(
                "net ip={} mask={} mac={} tap_ok={tap_ok}",
                cfg.host_ip,
                cfg.netmask,
                mac.join(":")
            );
        }
        Err(e) => println!("net errno={}", e.errno()),
    }
}
