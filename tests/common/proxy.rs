//! A TCP proxy the tests can cut and restore, to simulate a broker outage or a dropped network.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Accepting connections and holding them silent, like a server that hangs.
    hung: Arc<Mutex<Option<Vec<TcpStream>>>>,
    live: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    /// Forwards a fresh local port to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let up = Arc::new(AtomicBool::new(true));
        let hung: Arc<Mutex<Option<Vec<TcpStream>>>> = Arc::default();
        let live = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let target = target.to_owned();
        let (up2, live2, stop2, hung2) = (up.clone(), live.clone(), stop.clone(), hung.clone());
        tokio::spawn(async move {
            loop {
                let inbound = tokio::select! {
                    () = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                if let Some(held) = hung2.lock().expect("proxy lock").as_mut() {
                    held.push(inbound);
                    continue;
                }
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound); // refused: the "network" is down
                    continue;
                }
                let kill = live2.lock().expect("proxy lock").clone();
                let target = target.clone();
                let hung3 = hung2.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        () = kill.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    // Hung: the connection stays open and silent.
                    if let Some(held) = hung3.lock().expect("proxy lock").as_mut() {
                        held.extend([inbound, outbound]);
                    }
                });
            }
        });
        Self {
            addr,
            up,
            hung,
            live,
            stop,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut live = self.live.lock().expect("proxy lock");
        live.cancel();
        *live = CancellationToken::new();
    }

    /// Stops forwarding on every open connection, holding it open, and accepts new ones and
    /// never answers: a server that hangs, so clients wait out their timeouts.
    pub fn hang(&self) {
        *self.hung.lock().expect("proxy lock") = Some(Vec::new());
        let mut live = self.live.lock().expect("proxy lock");
        live.cancel();
        *live = CancellationToken::new();
    }

    /// Accepts connections again (and lets go of those held by [`Self::hang`]).
    pub fn restore(&self) {
        self.hung.lock().expect("proxy lock").take();
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}
