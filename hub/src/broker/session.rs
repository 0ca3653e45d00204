//! One client connection of the embedded broker: reads its CONNECT (within a deadline),
//! learns who it is, then relays its packets to the router task and the router's
//! messages to it, until it leaves, goes silent past its keep-alive, breaks a rule or
//! floods.

use super::router::{ConnId, Identity, Message};
use super::{Command, Ctx, Outbox, Proven};
use bytes::BytesMut;
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Why a connection ended (logged at debug, or counted).
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed MQTT: {0:?}")]
    Malformed(rumqttc::mqttbytes::Error),
    #[error("no CONNECT within {0:?}")]
    NoConnect(Duration),
    #[error("first packet was not CONNECT")]
    NotConnect,
    #[error("refused: {0}")]
    Refused(#[from] ConnectRefusal),
    #[error("QoS 2, which this broker does not take")]
    Qos2,
    #[error("a packet this broker does not take")]
    Unexpected,
    #[error("{who} published on {topic:?}, which it may not")]
    NotAllowed { who: Identity, topic: String },
    #[error("{0} sent more than its rate allows: cut off")]
    Flood(Identity),
    #[error("silent past its keep-alive")]
    Silent,
    #[error("not reading what it is sent")]
    Stuck,
    #[error("replaced, slow or no longer enrolled")]
    Closed,
    #[error("left")]
    Left,
    #[error("the broker is stopping")]
    Stopping,
}

/// Why a client is refused at CONNECT; each answered with its return code.
#[derive(Debug, thiserror::Error)]
pub enum ConnectRefusal {
    #[error(transparent)]
    Certificate(super::pki::AcceptError),
    #[error("the hub's user with a wrong secret")]
    WrongSecret,
    #[error("an empty client id on the loopback listener")]
    EmptyClientId,
    #[error("{who} sent client id {id:?}, which is another's")]
    AnothersId { who: Identity, id: String },
    #[error("{0} flooded a moment ago")]
    Cooling(Identity),
    #[error("{0} is no longer enrolled")]
    NotEnrolled(Identity),
}

impl ConnectRefusal {
    fn code(&self) -> ConnectReturnCode {
        match self {
            ConnectRefusal::Certificate(_) | ConnectRefusal::NotEnrolled(_) => {
                ConnectReturnCode::NotAuthorized
            }
            ConnectRefusal::WrongSecret => ConnectReturnCode::BadUserNamePassword,
            ConnectRefusal::EmptyClientId | ConnectRefusal::AnothersId { .. } => {
                ConnectReturnCode::BadClientId
            }
            ConnectRefusal::Cooling(_) => ConnectReturnCode::ServiceUnavailable,
        }
    }
}

/// A token bucket of messages: `burst` at once, refilled at `per_sec`.
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: f64,
    per_sec: f64,
    burst: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    pub(super) fn new(per_sec: f64, burst: f64, now: tokio::time::Instant) -> Bucket {
        Bucket {
            tokens: burst,
            per_sec,
            burst,
            at: now,
        }
    }

    /// Takes one token: false when the bucket is empty.
    pub(super) fn take(&mut self, now: tokio::time::Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// How long one packet may take to reach a client that stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection's framing: packets read from and written to the stream.
struct Wire<S> {
    stream: S,
    rx: BytesMut,
    tx: BytesMut,
    /// The largest packet read (its remaining length, as rumqttc checks it).
    max: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// Cancel-safe: what was read stays in `rx`.
    async fn read(&mut self) -> Result<Packet, SessionEnd> {
        loop {
            match Packet::read(&mut self.rx, self.max) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(SessionEnd::Malformed(e)),
            }
            if self.stream.read_buf(&mut self.rx).await? == 0 {
                return Err(SessionEnd::Left);
            }
        }
    }

    async fn write(&mut self, p: Packet) -> Result<(), SessionEnd> {
        // rumqttc checks a whole packet when writing, its remaining length when reading:
        // the fixed header's at most 5 bytes on top.
        p.write(&mut self.tx, self.max + 5)
            .map_err(SessionEnd::Malformed)?;
        let sent = async {
            self.stream.write_all(&self.tx).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(WRITE_TIMEOUT, sent)
            .await
            .map_err(|_| SessionEnd::Stuck)??;
        self.tx.clear();
        Ok(())
    }
}

/// A connected client: who it is, its connection, and the packet ids of what it is sent.
struct Client<'a> {
    who: Identity,
    conn: ConnId,
    ctx: &'a Ctx,
    pkid: u16,
}

impl Client<'_> {
    fn publish(&mut self, msg: Message) -> Packet {
        self.pkid = self.pkid % u16::MAX + 1;
        let mut p = Publish::new(msg.topic, QoS::AtLeastOnce, msg.payload);
        p.retain = msg.retain;
        p.pkid = self.pkid;
        Packet::Publish(p)
    }

    async fn ask(&self, command: Command) -> Result<(), SessionEnd> {
        self.ctx
            .router
            .send(command)
            .await
            .map_err(|_| SessionEnd::Stopping)
    }
}

/// Serves one connection to its end. `proven` is what the TLS handshake showed.
pub(super) async fn serve<S>(
    stream: S,
    proven: Proven,
    ctx: Arc<Ctx>,
    conn: ConnId,
) -> Result<(), SessionEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut wire = Wire {
        stream,
        rx: BytesMut::with_capacity(1024),
        tx: BytesMut::new(),
        // A QoS 0 publish is delivered at QoS 1, two bytes (its packet id) larger: what
        // is read must still fit the fleet's clients' limit when delivered.
        max: ctx.limits.max_packet - 2,
    };
    let connect = match tokio::time::timeout(ctx.limits.connect_timeout, wire.read()).await {
        Err(_) => return Err(SessionEnd::NoConnect(ctx.limits.connect_timeout)),
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(_)) => return Err(SessionEnd::NotConnect),
        Ok(Err(e)) => return Err(e),
    };
    let (who, key) = match admit(&ctx, proven, &connect) {
        Ok(admitted) => admitted,
        Err(refusal) => return refuse(&mut wire, &ctx, refusal).await,
    };
    let outbox_len = if who == Identity::Hub {
        ctx.limits.hub_outbox
    } else {
        ctx.limits.outbox
    };
    let (tx, rx) = mpsc::channel(outbox_len);
    let close = ctx.stop.child_token();
    let outbox = Outbox {
        tx,
        close: close.clone(),
    };
    let mut client = Client {
        who,
        conn,
        ctx: &ctx,
        pkid: 0,
    };
    let (reply, admitted) = oneshot::channel();
    client
        .ask(Command::Connect(
            client.who.clone(),
            key,
            conn,
            outbox,
            reply,
        ))
        .await?;
    if !admitted.await.map_err(|_| SessionEnd::Stopping)? {
        let refusal = ConnectRefusal::NotEnrolled(client.who.clone());
        return refuse(&mut wire, &ctx, refusal).await;
    }
    // Keep-alive 0: the client asked for none.
    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_secs(u64::from(connect.keep_alive)) * 3 / 2);
    let success = ConnAck::new(ConnectReturnCode::Success, false);
    let result = match wire.write(Packet::ConnAck(success)).await {
        Ok(()) => relay(&mut wire, &mut client, rx, &close, keep_alive).await,
        Err(e) => Err(e),
    };
    let who = client.who.clone();
    let _ = client.ask(Command::Disconnect(who.clone(), conn)).await;
    if let Err(SessionEnd::Flood(_) | SessionEnd::NotAllowed { .. }) = &result {
        ctx.metrics.cut_off.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(SessionEnd::Flood(_)) = &result {
        ctx.cool(&who);
    }
    result
}

/// Answers a CONNECT with the refusal's return code, counted, and ends the connection.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    ctx: &Ctx,
    refusal: ConnectRefusal,
) -> Result<(), SessionEnd> {
    ctx.metrics.refused.fetch_add(1, Ordering::Relaxed);
    wire.write(Packet::ConnAck(ConnAck::new(refusal.code(), false)))
        .await?;
    Err(SessionEnd::Refused(refusal))
}

/// Who a client is (with a device's key), or why it is refused at CONNECT.
type Admitted = Result<(Identity, Option<[u8; 32]>), ConnectRefusal>;

/// Who a CONNECT comes from, and whether it is let in: not if its client id names
/// another (the hub's, another device's), nor while it is refused for flooding.
fn admit(ctx: &Ctx, proven: Proven, connect: &rumqttc::Connect) -> Admitted {
    let (who, key) = identify(ctx, proven, connect)?;
    let id = connect.client_id.as_str();
    let another = match &who {
        Identity::Hub => false,
        Identity::Device(name) => {
            id.starts_with(HUB_ID_PREFIX)
                || id.strip_prefix(DEVICE_ID_PREFIX).is_some_and(|n| n != name)
        }
        Identity::Local(_) => id.starts_with(HUB_ID_PREFIX),
    };
    if another {
        let id = id.to_string();
        return Err(ConnectRefusal::AnothersId { who, id });
    }
    if ctx.cooling(&who) {
        return Err(ConnectRefusal::Cooling(who));
    }
    Ok((who, key))
}

/// The client ids of the hub's and the devices' clients (`unifleet-hub-<fleet>`,
/// `unifleet-device-<name>`).
const HUB_ID_PREFIX: &str = "unifleet-hub-";
const DEVICE_ID_PREFIX: &str = "unifleet-device-";

/// Who a CONNECT comes from: the TLS identity, or on loopback the hub (by the secret it
/// was given in-process) or a local client named by its client id.
fn identify(ctx: &Ctx, proven: Proven, connect: &rumqttc::Connect) -> Admitted {
    match proven {
        Proven::Tls(who, key) => return Ok((who, Some(key))),
        Proven::Refused(e) => return Err(ConnectRefusal::Certificate(e)),
        Proven::Loopback => {}
    }
    match &connect.login {
        Some(l) if l.username == super::HUB_USER => {
            if constant_time_eq(l.password.as_bytes(), ctx.hub_secret.as_bytes()) {
                Ok((Identity::Hub, None))
            } else {
                Err(ConnectRefusal::WrongSecret)
            }
        }
        _ if connect.client_id.is_empty() => Err(ConnectRefusal::EmptyClientId),
        _ => Ok((Identity::Local(connect.client_id.clone()), None)),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The connected loop: packets from the client, messages for it, until one side ends.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    client: &mut Client<'_>,
    mut rx: mpsc::Receiver<Message>,
    close: &CancellationToken,
    keep_alive: Option<Duration>,
) -> Result<(), SessionEnd> {
    let limits = &client.ctx.limits;
    let now = tokio::time::Instant::now;
    let mut bucket = (client.who != Identity::Hub)
        .then(|| Bucket::new(limits.rate_per_sec, limits.burst, now()));
    let mut heard = now();
    loop {
        let silent_at = keep_alive.map(|k| heard + k);
        // Biased: what the client sent is read before its silence is judged (a PINGREQ
        // waiting behind a long batch of retained messages is not silence).
        tokio::select! {
            biased;
            _ = close.cancelled() => {
                let stopping = client.ctx.stop.is_cancelled();
                return Err(if stopping { SessionEnd::Stopping } else { SessionEnd::Closed });
            }
            packet = wire.read() => {
                let packet = packet?;
                heard = now();
                let cost = match &packet {
                    Packet::Publish(_) => 1,
                    Packet::Subscribe(s) => s.filters.len().max(1),
                    Packet::Unsubscribe(u) => u.topics.len().max(1),
                    _ => 0,
                };
                if let Some(bucket) = &mut bucket {
                    if (0..cost).any(|_| !bucket.take(heard)) {
                        return Err(SessionEnd::Flood(client.who.clone()));
                    }
                }
                for answer in handle(packet, client).await? {
                    wire.write(answer).await?;
                }
                // The client could not be heard while it was being written to.
                heard = now();
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { return Err(SessionEnd::Closed) };
                let p = client.publish(msg);
                wire.write(p).await?;
            }
            _ = sleep_until(silent_at) => return Err(SessionEnd::Silent),
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One packet from the client: what to answer (for a subscription, the retained
/// messages it matches after the SUBACK).
async fn handle(packet: Packet, client: &mut Client<'_>) -> Result<Vec<Packet>, SessionEnd> {
    let (who, conn) = (client.who.clone(), client.conn);
    match packet {
        Packet::Publish(p) if p.qos == QoS::ExactlyOnce => Err(SessionEnd::Qos2),
        Packet::Publish(p) => {
            let (reply, answer) = oneshot::channel();
            let msg = Message {
                topic: p.topic.clone(),
                payload: p.payload,
                retain: p.retain,
            };
            client
                .ask(Command::Publish(who.clone(), conn, msg, reply))
                .await?;
            if answer.await.map_err(|_| SessionEnd::Stopping)?.is_err() {
                return Err(SessionEnd::NotAllowed {
                    who,
                    topic: p.topic,
                });
            }
            Ok(match p.qos {
                QoS::AtMostOnce => vec![],
                _ => vec![Packet::PubAck(PubAck::new(p.pkid))],
            })
        }
        Packet::Subscribe(s) => {
            let (reply, answer) = oneshot::channel();
            let qos: Vec<QoS> = s.filters.iter().map(|f| f.qos).collect();
            let filters = s.filters.into_iter().map(|f| f.path).collect();
            client
                .ask(Command::Subscribe(who, conn, filters, reply))
                .await?;
            let granted = answer.await.map_err(|_| SessionEnd::Stopping)?;
            let mut retained = vec![];
            let mut codes = vec![];
            for (g, asked) in granted.into_iter().zip(qos) {
                match g {
                    Ok(messages) => {
                        let qos = if asked == QoS::AtMostOnce {
                            asked
                        } else {
                            QoS::AtLeastOnce
                        };
                        codes.push(SubscribeReasonCode::Success(qos));
                        retained.extend(messages);
                    }
                    Err(_) => codes.push(SubscribeReasonCode::Failure),
                }
            }
            let mut out = vec![Packet::SubAck(SubAck::new(s.pkid, codes))];
            out.extend(retained.into_iter().map(|m| client.publish(m)));
            Ok(out)
        }
        Packet::Unsubscribe(u) => {
            client
                .ask(Command::Unsubscribe(who, conn, u.topics))
                .await?;
            Ok(vec![Packet::UnsubAck(UnsubAck::new(u.pkid))])
        }
        Packet::PingReq => Ok(vec![Packet::PingResp]),
        Packet::PubAck(_) => Ok(vec![]),
        Packet::Disconnect => Err(SessionEnd::Left),
        // A second CONNECT, or packets only a server sends.
        _ => Err(SessionEnd::Unexpected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = tokio::time::Instant::now();
        let mut b = Bucket::new(2.0, 3.0, t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(500)));
        assert!(!b.take(t0 + Duration::from_millis(600)));
        // Refill stops at the burst.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(later)));
        assert!(!b.take(later));
    }
}
