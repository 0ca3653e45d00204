//! One client connection of the embedded broker: reads its CONNECT (within a deadline),
//! learns who it is, then relays its packets to the router task and the router's
//! messages to it, until it leaves, goes silent past its keep-alive, breaks a rule or
//! floods.

use super::router::{ConnId, Identity, Message, Refusal};
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
    Refused(String),
    #[error("{who} published on {topic:?}, which it may not")]
    NotAllowed { who: Identity, topic: String },
    #[error("{0} sent more than its rate allows: cut off")]
    Flood(Identity),
    #[error("silent past its keep-alive")]
    Silent,
    #[error("replaced, slow or no longer enrolled")]
    Closed,
    #[error("left")]
    Left,
    #[error("the broker is stopping")]
    Stopping,
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

/// A connection's framing: packets read from and written to the stream.
struct Wire<S> {
    stream: S,
    rx: BytesMut,
    tx: BytesMut,
    max: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
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
        p.write(&mut self.tx, self.max)
            .map_err(SessionEnd::Malformed)?;
        self.stream.write_all(&self.tx).await?;
        self.tx.clear();
        self.stream.flush().await?;
        Ok(())
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
        max: ctx.limits.max_packet,
    };
    let connect = match tokio::time::timeout(ctx.limits.connect_timeout, wire.read()).await {
        Err(_) => return Err(SessionEnd::NoConnect(ctx.limits.connect_timeout)),
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(_)) => return Err(SessionEnd::NotConnect),
        Ok(Err(e)) => return Err(e),
    };
    let who = match identify(&ctx, proven, &connect) {
        Ok(who) if ctx.cooling(&who) => {
            ctx.metrics.refused.fetch_add(1, Ordering::Relaxed);
            let code = ConnectReturnCode::ServiceUnavailable;
            wire.write(Packet::ConnAck(ConnAck::new(code, false)))
                .await?;
            return Err(SessionEnd::Refused(format!("{who} flooded a moment ago")));
        }
        Ok(who) => who,
        Err((code, why)) => {
            ctx.metrics.refused.fetch_add(1, Ordering::Relaxed);
            wire.write(Packet::ConnAck(ConnAck::new(code, false)))
                .await?;
            return Err(SessionEnd::Refused(why));
        }
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
    if ctx
        .router
        .send(Command::Connect(who.clone(), conn, outbox))
        .await
        .is_err()
    {
        return Err(SessionEnd::Stopping);
    }
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive.max(1)) * 3 / 2);
    let result = async {
        wire.write(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await?;
        relay(&mut wire, &who, &ctx, rx, &close, keep_alive).await
    }
    .await;
    let _ = ctx
        .router
        .send(Command::Disconnect(who.clone(), conn))
        .await;
    if let Err(SessionEnd::Flood(_) | SessionEnd::NotAllowed { .. }) = &result {
        ctx.metrics.cut_off.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(SessionEnd::Flood(_)) = &result {
        ctx.cool(&who);
    }
    result
}

/// Who a CONNECT comes from: the TLS identity, or on loopback the hub (by the secret it
/// was given in-process) or a local client named by its client id.
fn identify(
    ctx: &Ctx,
    proven: Proven,
    connect: &rumqttc::Connect,
) -> Result<Identity, (ConnectReturnCode, String)> {
    match proven {
        Proven::Tls(who) => return Ok(who),
        Proven::Refused(e) => return Err((ConnectReturnCode::NotAuthorized, e.to_string())),
        Proven::Loopback => {}
    }
    match &connect.login {
        Some(l) if l.username == super::HUB_USER => {
            if constant_time_eq(l.password.as_bytes(), ctx.hub_secret.as_bytes()) {
                Ok(Identity::Hub)
            } else {
                Err((
                    ConnectReturnCode::BadUserNamePassword,
                    "the hub's user with a wrong secret".into(),
                ))
            }
        }
        _ if connect.client_id.is_empty() => Err((
            ConnectReturnCode::BadClientId,
            "an empty client id on the loopback listener".into(),
        )),
        _ => Ok(Identity::Local(connect.client_id.clone())),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The connected loop: packets from the client, messages for it, until one side ends.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    who: &Identity,
    ctx: &Ctx,
    mut rx: mpsc::Receiver<Message>,
    close: &CancellationToken,
    keep_alive: Duration,
) -> Result<(), SessionEnd> {
    let mut bucket = (*who != Identity::Hub).then(|| {
        Bucket::new(
            ctx.limits.rate_per_sec,
            ctx.limits.burst,
            tokio::time::Instant::now(),
        )
    });
    let mut pkid: u16 = 0;
    loop {
        tokio::select! {
            _ = close.cancelled() => return Err(if ctx.stop.is_cancelled() { SessionEnd::Stopping } else { SessionEnd::Closed }),
            msg = rx.recv() => {
                let Some(msg) = msg else { return Err(SessionEnd::Closed) };
                pkid = pkid % u16::MAX + 1;
                let mut p = Publish::new(msg.topic, QoS::AtLeastOnce, msg.payload);
                p.retain = msg.retain;
                p.pkid = pkid;
                wire.write(Packet::Publish(p)).await?;
            }
            packet = tokio::time::timeout(keep_alive, wire.read()) => {
                let packet = packet.map_err(|_| SessionEnd::Silent)??;
                if let Some(bucket) = &mut bucket {
                    if matches!(packet, Packet::Publish(_) | Packet::Subscribe(_))
                        && !bucket.take(tokio::time::Instant::now())
                    {
                        return Err(SessionEnd::Flood(who.clone()));
                    }
                }
                if let Some(answer) = handle(packet, who, ctx).await? {
                    wire.write(answer).await?;
                }
            }
        }
    }
}

/// One packet from the client: what to answer, if anything.
async fn handle(packet: Packet, who: &Identity, ctx: &Ctx) -> Result<Option<Packet>, SessionEnd> {
    match packet {
        Packet::Publish(p) => {
            let (reply, answer) = oneshot::channel();
            let msg = Message {
                topic: p.topic.clone(),
                payload: p.payload,
                retain: p.retain,
            };
            ask(ctx, Command::Publish(who.clone(), msg, reply)).await?;
            match answer.await.map_err(|_| SessionEnd::Stopping)? {
                Err(Refusal::NotAllowed) => {
                    return Err(SessionEnd::NotAllowed {
                        who: who.clone(),
                        topic: p.topic,
                    })
                }
                Err(Refusal::RetainedFull) => {
                    ctx.metrics.retained_full.fetch_add(1, Ordering::Relaxed);
                }
                Ok(()) => {}
            }
            Ok((p.qos != QoS::AtMostOnce).then(|| Packet::PubAck(PubAck::new(p.pkid))))
        }
        Packet::Subscribe(s) => {
            let (reply, answer) = oneshot::channel();
            let filters = s.filters.into_iter().map(|f| f.path).collect();
            ask(ctx, Command::Subscribe(who.clone(), filters, reply)).await?;
            let granted = answer.await.map_err(|_| SessionEnd::Stopping)?;
            let codes = granted
                .into_iter()
                .map(|ok| {
                    if ok {
                        SubscribeReasonCode::Success(QoS::AtLeastOnce)
                    } else {
                        SubscribeReasonCode::Failure
                    }
                })
                .collect();
            Ok(Some(Packet::SubAck(SubAck::new(s.pkid, codes))))
        }
        Packet::Unsubscribe(u) => {
            ask(ctx, Command::Unsubscribe(who.clone(), u.topics)).await?;
            Ok(Some(Packet::UnsubAck(UnsubAck::new(u.pkid))))
        }
        Packet::PingReq => Ok(Some(Packet::PingResp)),
        Packet::PubAck(_) => Ok(None),
        Packet::Disconnect => Err(SessionEnd::Left),
        // QoS 2, a second CONNECT, or packets only a server sends.
        _ => Err(SessionEnd::Refused(
            "a packet this broker does not take".into(),
        )),
    }
}

async fn ask(ctx: &Ctx, command: Command) -> Result<(), SessionEnd> {
    ctx.router
        .send(command)
        .await
        .map_err(|_| SessionEnd::Stopping)
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
