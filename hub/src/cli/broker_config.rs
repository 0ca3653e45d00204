//! `hub broker-config`: the fleet's broker for mosquitto (TLS, client certificates from
//! the hub's broker CA, the fleet's access rules), and a device's client certificate for
//! an operator's own MQTT client.

use anyhow::{Context, Result};
use hub::broker::pki::{BrokerCa, HUB_CN};
use hub::home::{now, Home};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Write a mosquitto configuration into DIR: mosquitto.conf, acl, ca.pem, crl.pem
    /// (the revoked devices' certificates), server.pem and server.key (0600). Run it as
    /// `mosquitto -c DIR/mosquitto.conf`, and give the hub `broker = "mqtts://HOST:PORT"`
    /// in hub.toml. Again after `hub revoke`, and restart mosquitto.
    #[arg(long, value_name = "DIR", required_unless_present = "client_cert")]
    mosquitto: Option<PathBuf>,
    /// Where mosquitto listens (with --mosquitto).
    #[arg(long, default_value = "0.0.0.0:8883", value_name = "ADDR")]
    listen: String,
    /// A host name or IP address the broker's certificate also carries, for clients that
    /// check the name they dial, such as mosquitto_sub (repeat). The fleet's own clients
    /// check the CA only.
    #[arg(long = "name", value_name = "HOST")]
    names: Vec<String>,
    /// Print the client certificate (PEM) of enrolled device NAME, for its key: with the
    /// device's key (PKCS#8) an operator's MQTT client can act as that device.
    #[arg(long, value_name = "NAME", conflicts_with = "mosquitto")]
    client_cert: Option<String>,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let home = Home::open(dir)?;
    let ca = BrokerCa::open(&home)?;
    if let Some(name) = &args.client_cert {
        let devices = hub::inventory::load_devices(&home.store()?)?;
        let key = devices
            .values()
            .find(|(n, _)| n == name)
            .map(|(_, k)| *k)
            .with_context(|| format!("{name:?} is not an enrolled device (`hub devices`)"))?;
        print!("{}", ca.issue_client(name, &key.0, now())?);
        return Ok(());
    }
    let out = args.mosquitto.expect("clap requires --mosquitto");
    let (host, port) = args
        .listen
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .with_context(|| format!("--listen {:?} is not HOST:PORT", args.listen))?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let (cert, key) = ca.issue_server(&args.names, now())?;
    write(&out.join("ca.pem"), &ca.pem(), 0o644)?;
    write(&out.join("server.pem"), &cert, 0o644)?;
    write(&out.join("server.key"), &key, 0o600)?;
    give_to_mosquitto(&out.join("server.key"))?;
    write(&out.join("acl"), &acl(&home.config.fleet), 0o644)?;
    let revoked: Vec<[u8; 32]> = hub::trust::revocations(&home.store()?, &home.anchor_root()?)?
        .map(|(l, _)| l.devices.iter().map(|d| d.key.0).collect())
        .unwrap_or_default();
    write(&out.join("crl.pem"), &ca.crl(&revoked, now())?, 0o644)?;
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    write(&out.join("mosquitto.conf"), &conf(&out, host, port), 0o644)?;
    println!(
        "wrote {dir}/mosquitto.conf (TLS on {host}:{port}, client certificates of this hub's \
         CA, the fleet's access rules, {n} revoked device(s))\nrun:  mosquitto -c {dir}/mosquitto.conf\nthen: broker = \
         \"mqtts://HOST:{port}\" in {hub}/hub.toml, and devices enrolled with --broker \
         mqtts://HOST:{port} --broker-ca {hub}/broker-ca.pem",
        dir = out.display(),
        hub = home.dir.display(),
        n = revoked.len()
    );
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// mosquitto started as root reads its key as the user it drops to, `mosquitto`: the key
/// is that user's (readable by nobody else) when there is one and we may give it.
fn give_to_mosquitto(key: &Path) -> Result<()> {
    let Ok(Some(user)) = nix::unistd::User::from_name("mosquitto") else {
        return Ok(());
    };
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    nix::unistd::chown(key, Some(user.uid), Some(user.gid))
        .with_context(|| format!("giving {} to user mosquitto", key.display()))
}

/// The fleet's access rules in mosquitto's terms: the hub everything in the fleet, each
/// device (its certificate's name is its user) its own status and the fleet's releases
/// and trust records.
fn acl(fleet: &str) -> String {
    let [root, revocations, holds] = net::mqtt_topics::trust(fleet);
    format!(
        "# Written by `hub broker-config`.\n\
         user {HUB_CN}\n\
         topic readwrite unifleet/{fleet}/#\n\n\
         pattern write {status}\n\
         pattern read unifleet/{fleet}/release/#\n\
         pattern read {root}\n\
         pattern read {revocations}\n\
         pattern read {holds}\n",
        status = net::mqtt_topics::status(fleet, "%u"),
    )
}

fn conf(dir: &Path, host: &str, port: u16) -> String {
    let d = dir.display();
    format!(
        "# Written by `hub broker-config`: TLS only, a client certificate of the hub's broker\n\
         # CA required, its name the client's user and client id (so nobody takes over\n\
         # another's session), the fleet's access rules, bounded memory.\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         listener {port} {host}\n\
         cafile {d}/ca.pem\n\
         certfile {d}/server.pem\n\
         keyfile {d}/server.key\n\
         tls_version tlsv1.3\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         use_username_as_clientid true\n\
         crlfile {d}/crl.pem\n\
         acl_file {d}/acl\n\
         max_packet_size 17000\n\
         max_queued_messages 100\n\
         memory_limit 268435456\n\
         persistence false\n"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn devices_may_write_only_their_own_status() {
        let acl = super::acl("home");
        assert!(acl.contains("pattern write unifleet/home/status/%u\n"));
        assert!(!acl.contains("pattern readwrite"));
        assert!(acl.contains("user Unifleet-Hub\ntopic readwrite unifleet/home/#\n"));
    }
}
