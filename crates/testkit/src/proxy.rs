//! A TCP forwarder to cut one client off a server while it keeps running.

use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP forwarder on a free loopback port, to cut one client off a server
/// (for example one node off Redis) while the server keeps running.
pub struct TcpProxy {
    pub port: u16,
    enabled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// While true, bytes from the target are held back from the client.
    held: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Forward 127.0.0.1:`port` to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let enabled = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let held = Arc::new(tokio::sync::watch::channel(false).0);
        let (en, gen, hold) = (enabled.clone(), generation.clone(), held.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !en.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let mut cut = gen.subscribe();
                let mut held = hold.subscribe();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut in_read, mut in_write) = inbound.split();
                    let (mut out_read, mut out_write) = outbound.split();
                    let up = tokio::io::copy(&mut in_read, &mut out_write);
                    // Target to client, each chunk waiting while held.
                    let down = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match out_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if held.wait_for(|h| !*h).await.is_err()
                                        || in_write.write_all(&buf[..n]).await.is_err()
                                    {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpProxy {
            port,
            enabled,
            generation,
            held,
            task,
        }
    }

    /// Stop passing bytes from the target to the client (the client's bytes
    /// still reach the target), on open and new connections, until
    /// [`restore`](Self::restore): for example to lose a server's answer.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Drop every forwarded connection and refuse new ones.
    pub fn cut(&self) {
        self.enabled
            .store(false, std::sync::atomic::Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forward again (both ways).
    pub fn restore(&self) {
        self.held.send_replace(false);
        self.enabled
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// A redis:// URL through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
