//! libvirt domains the tests start, looked up and cleaned up.

/// A libvirt connection without libvirt's default error printing (a domain that vanished
/// between listing and lookup is normal here).
fn connect(uri: &str) -> Result<virt::connect::Connect, virt::error::Error> {
    virt::error::clear_error_callback();
    virt::connect::Connect::open(Some(uri))
}

/// Destroys running domains whose names start with any of `prefixes`.
pub fn destroy_domains(uri: &str, prefixes: &[String]) {
    let Ok(conn) = connect(uri) else {
        return;
    };
    if let Ok(domains) = conn.list_all_domains(0) {
        for d in domains {
            if d.name()
                .is_ok_and(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
            {
                let _ = d.destroy();
                let _ = d.undefine();
            }
        }
    }
}

/// Whether a domain of this name is running on `uri`.
pub fn domain_running(uri: &str, name: &str) -> bool {
    connect(uri)
        .and_then(|c| c.lookup_domain_by_name(name))
        .and_then(|d| d.is_active())
        .unwrap_or(false)
}

/// Names of running domains on `uri` that start with `prefix`.
pub fn running_domains(uri: &str, prefix: &str) -> Vec<String> {
    let Ok(conn) = connect(uri) else {
        return vec![];
    };
    conn.list_all_domains(0)
        .map(|ds| {
            ds.into_iter()
                .filter(|d| d.is_active().unwrap_or(false))
                .filter_map(|d| d.name().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}
