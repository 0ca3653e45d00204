//! The main loop: a fixed pool of listening TCP sockets on the one port, each re-listening
//! after its connection ends, feeding requests to [`App`] and its answers back.

use crate::arch;
use crate::net::{self, Addressing, NetDevice};
use crate::pci::Nic;
use alloc::vec::Vec;
use hello_http::app::{App, Outcome};
use hello_http::config::Config;
use hello_http::http::{self, Parse, MAX_REQUEST};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};

/// Concurrent connections: one listening socket each (smoltcp has no accept queue).
pub const SOCKETS: usize = 72;
const RX_WINDOW: usize = 2048;
const TX_BUFFER: usize = 4096;
/// Room a response needs before a request is answered (the largest, /metrics, is ~1 KiB).
const RESPONSE_ROOM: usize = 2048;
/// Longest sleep when nothing is due, so DHCP and TCP timers are never late by more.
const MAX_SLEEP_US: u64 = 50_000;
/// A connection with no request in progress is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

fn now() -> Instant {
    Instant::from_micros(arch::now_micros() as i64)
}

pub fn run(nic: Nic, config: Config) -> ! {
    let mut device = NetDevice::new(nic);
    let [a, b, c, d, e, f] = device.mac().0;
    let mac = alloc::format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}");
    crate::println!("mac {mac}");
    let (port, address) = (config.port, config.address);
    let mut app = App::new(config, mac);
    let mut sockets = SocketSet::new(Vec::with_capacity(SOCKETS + 1));
    let (mut iface, addressing) = net::interface(&mut device, address, &mut sockets, now());
    let mut conns: Vec<Conn> = (0..SOCKETS)
        .map(|_| Conn::new(&mut sockets, port))
        .collect();
    let mut configured = address.is_some();
    if let Some(address) = address {
        crate::println!("listening on {}:{port}", address.ip);
    }
    loop {
        device.ack_interrupt();
        let now = now();
        iface.poll(now, &mut device, &mut sockets);
        if let Addressing::Dhcp(handle) = addressing {
            match net::poll_dhcp(&mut iface, &mut sockets, handle) {
                Some(Some(ip)) => {
                    crate::println!("listening on {ip}:{port}");
                    configured = true;
                }
                Some(None) if configured => {
                    crate::println!("dhcp: lease lost, not listening");
                    configured = false;
                }
                _ => {}
            }
        }
        let uptime = (now.total_micros() / 1_000_000) as u64;
        for conn in &mut conns {
            conn.service(sockets.get_mut(conn.handle), &mut app, now, uptime, port);
        }
        let delay = iface.poll_delay(now, &sockets).map(|d| d.total_micros());
        if delay == Some(0) || device.has_frame() {
            continue;
        }
        arch::idle(delay.map_or(MAX_SLEEP_US, |d| d.min(MAX_SLEEP_US)));
    }
}

/// One socket of the pool and the request bytes read from it so far.
struct Conn {
    handle: SocketHandle,
    request: Vec<u8>,
    response: Vec<u8>,
    /// Counted as accepted/open (between establishment and the socket closing).
    open: bool,
    /// `close()` was called: answer nothing more.
    closing: bool,
    /// A request that will never be answered (the `health_fail_after` hang).
    hung: bool,
    last_active: Instant,
}

impl Conn {
    fn new(sockets: &mut SocketSet<'_>, port: u16) -> Conn {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(alloc::vec![0; RX_WINDOW]),
            tcp::SocketBuffer::new(alloc::vec![0; TX_BUFFER]),
        );
        // A peer that stops acknowledging is dropped rather than holding the socket.
        socket.set_timeout(Some(Duration::from_secs(30)));
        let _ = socket.listen(port);
        Conn {
            handle: sockets.add(socket),
            request: Vec::with_capacity(MAX_REQUEST),
            response: Vec::with_capacity(RESPONSE_ROOM),
            open: false,
            closing: false,
            hung: false,
            last_active: Instant::ZERO,
        }
    }

    fn service(
        &mut self,
        socket: &mut tcp::Socket,
        app: &mut App,
        now: Instant,
        uptime: u64,
        port: u16,
    ) {
        match socket.state() {
            State::Closed => return self.relisten(socket, app, port),
            // We closed first: skip TIME-WAIT's 10 s so the socket serves again at once.
            State::TimeWait => return socket.abort(),
            State::Listen | State::SynReceived => return,
            _ => {}
        }
        if !self.open {
            self.open = true;
            self.last_active = now;
            app.stats.accepted += 1;
            app.stats.open += 1;
        }
        if self.read(socket, app) > 0 {
            self.last_active = now;
        }
        if !self.closing && !self.hung {
            self.answer(socket, app, uptime);
        }
        let idle = now - self.last_active > IDLE_TIMEOUT && self.request.is_empty();
        if !self.closing && (!socket.may_recv() || idle) {
            // The peer finished sending (and every whole request was answered), or idled out.
            socket.close();
            self.closing = true;
        }
    }

    fn relisten(&mut self, socket: &mut tcp::Socket, app: &mut App, port: u16) {
        if self.open {
            app.stats.open -= 1;
        }
        self.request.clear();
        (self.open, self.closing, self.hung) = (false, false, false);
        let _ = socket.listen(port);
    }

    /// Moves received bytes into the request buffer (discarding them once closing).
    fn read(&mut self, socket: &mut tcp::Socket, app: &mut App) -> usize {
        let mut total = 0;
        while socket.can_recv() && self.request.len() < MAX_REQUEST {
            let start = self.request.len();
            self.request.resize(MAX_REQUEST, 0);
            let n = socket.recv_slice(&mut self.request[start..]).unwrap_or(0);
            self.request
                .truncate(if self.closing { 0 } else { start + n });
            total += n;
            if n == 0 {
                break;
            }
        }
        app.stats.bytes_in += total as u64;
        total
    }

    /// Answers every whole request in the buffer, in order, while responses fit.
    fn answer(&mut self, socket: &mut tcp::Socket, app: &mut App, uptime: u64) {
        while socket.send_capacity() - socket.send_queue() >= RESPONSE_ROOM {
            let parsed = http::parse(&self.request);
            let consumed = match parsed {
                Parse::Incomplete => return,
                Parse::Complete(request) => request.len,
                Parse::Error(_) => self.request.len(),
            };
            self.response.clear();
            match app.handle(parsed, uptime, &mut self.response) {
                Outcome::Hang => {
                    self.hung = true;
                    return;
                }
                Outcome::Responded { keep_alive } => {
                    let sent = socket.send_slice(&self.response).unwrap_or(0);
                    app.stats.bytes_out += sent as u64;
                    self.request.drain(..consumed);
                    if !keep_alive {
                        socket.close();
                        self.closing = true;
                        return;
                    }
                }
            }
        }
    }
}
