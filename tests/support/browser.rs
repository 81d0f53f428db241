//! A headless Chromium driven over W3C WebDriver, for tests of pages as a person sees them.
//!
//! Hand-written over hyper rather than a WebDriver crate: the dozen commands the tests need are plain JSON
//! over HTTP, and the crates that wrap them bring their own HTTP stacks and runtimes. Debian's `chromium` and
//! `chromium-driver` are what `.ci/run` installs; without them `Browser::start` returns `None` and says so,
//! so `cargo test` passes on a box without a browser.
//!
//! Each `Browser` is its own `chromedriver` on a free loopback port, in its own process group (so Drop can
//! take chromium's children down with it), with a fresh profile directory. Chromium's background traffic
//! (updates, sync, field trials) is switched off: it would only ever hit refused connections here, and
//! tests send traffic to loopback alone. Waits poll with `DEADLINE`, never sleep a fixed time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::DEADLINE;

/// The key under which WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How often waits look again.
const POLL: Duration = Duration::from_millis(50);

/// What a WebDriver command answered instead of a value.
#[derive(Debug, Clone)]
pub struct WebDriverError {
    /// W3C error code, e.g. "no such element", "stale element reference"; "transport" when no answer.
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// One cookie as the browser holds it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub secure: bool,
    #[serde(default, rename = "httpOnly")]
    pub http_only: bool,
    #[serde(default, rename = "sameSite")]
    pub same_site: Option<String>,
    /// Seconds since the epoch; `None` for a session cookie.
    #[serde(default)]
    pub expiry: Option<u64>,
}

/// The WebDriver session: what elements need to send commands.
struct Session {
    http: Client<HttpConnector, Full<Bytes>>,
    /// `http://127.0.0.1:<port>/session/<id>`
    base: String,
}

impl Session {
    async fn command(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        send(&self.http, method, &format!("{}{path}", self.base), body).await
    }
}

async fn send(
    http: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, WebDriverError> {
    let transport = |e: &dyn std::fmt::Display| WebDriverError {
        error: "transport".into(),
        message: format!("{method} {url}: {e}"),
    };
    let body = match body {
        Some(value) => Bytes::from(value.to_string()),
        None => Bytes::new(),
    };
    let request = Request::builder()
        .method(method.clone())
        .uri(url)
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(body))
        .expect("a valid request");
    let response = http.request(request).await.map_err(|e| transport(&e))?;
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| transport(&e))?
        .to_bytes();
    let mut answer: Value = serde_json::from_slice(&bytes).map_err(|e| transport(&e))?;
    let value = answer["value"].take();
    match value.get("error").and_then(Value::as_str) {
        Some(error) => Err(WebDriverError {
            error: error.to_string(),
            message: value["message"].as_str().unwrap_or_default().to_string(),
        }),
        None => Ok(value),
    }
}

/// A headless Chromium. Dropping it ends the session and kills chromedriver and the browser.
pub struct Browser {
    session: Arc<Session>,
    driver: Child,
    driver_addr: SocketAddr,
    profile: PathBuf,
}

/// An element found on the current page (stale once the page changes: find it again).
#[derive(Clone)]
pub struct Element {
    session: Arc<Session>,
    id: String,
    css: String,
}

/// `name` found on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// A new empty directory under the system temp dir, unique within this machine.
pub fn temp_dir(what: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "walhook-{what}-{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session, or returns `None` (saying so) when they are not
    /// installed. Panics when they are installed but do not start.
    pub async fn start() -> Option<Browser> {
        let (Some(driver), Some(chromium)) = (
            which("chromedriver"),
            ["chromium", "chromium-browser", "google-chrome"]
                .iter()
                .find_map(|name| which(name)),
        ) else {
            eprintln!(
                "chromium not installed: skipped (apt-get install chromium chromium-driver, as .ci/run does)"
            );
            return None;
        };
        let profile = temp_dir("browser");
        let log = std::fs::File::create(profile.join("chromedriver.log")).expect("create the log");
        let port = free_port();
        let driver_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&driver)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone the log handle"))
                .stderr(log)
                .process_group(0)
                // chromium's crash database and caches go to the profile too, not to $HOME
                .env("XDG_CONFIG_HOME", &profile)
                .env("XDG_CACHE_HOME", &profile)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", driver.display()))
        };
        let http = Client::builder(TokioExecutor::new()).build_http();
        // from here on Drop cleans up, whatever panics
        let mut browser = Browser {
            session: Arc::new(Session {
                http: http.clone(),
                base: String::new(),
            }),
            driver: child,
            driver_addr,
            profile,
        };
        let root = format!("http://{driver_addr}");
        let until = Instant::now() + DEADLINE;
        loop {
            let ready = send(&http, Method::GET, &format!("{root}/status"), None).await;
            if matches!(&ready, Ok(status) if status["ready"] == true) {
                break;
            }
            if let Ok(Some(exit)) = browser.driver.try_wait() {
                panic!("chromedriver exited ({exit}): {}", browser.driver_log());
            }
            assert!(
                Instant::now() < until,
                "chromedriver not ready on {driver_addr}: {ready:?}\n{}",
                browser.driver_log()
            );
            tokio::time::sleep(POLL).await;
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-crash-reporter",
            "--disable-features=Translate,OptimizationHints,MediaRouter",
            "--window-size=1280,900",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!(
            "--user-data-dir={}",
            browser.profile.join("profile").display()
        )])
        .collect::<Vec<_>>();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let created = send(
            &http,
            Method::POST,
            &format!("{root}/session"),
            Some(capabilities),
        )
        .await
        .unwrap_or_else(|e| panic!("start a chromium session: {e}\n{}", browser.driver_log()));
        let id = created["sessionId"]
            .as_str()
            .expect("a new session has an id")
            .to_string();
        browser.session = Arc::new(Session {
            http,
            base: format!("{root}/session/{id}"),
        });
        Some(browser)
    }

    fn driver_log(&self) -> String {
        std::fs::read_to_string(self.profile.join("chromedriver.log")).unwrap_or_default()
    }

    async fn command(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.session
            .command(method.clone(), path, body)
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"))
    }

    /// Opens `url` and waits for the page to load. Chromium here resolves only loopback names.
    pub async fn goto(&self, url: &str) {
        self.command(Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Back in the history, as the browser's button does.
    pub async fn back(&self) {
        self.command(Method::POST, "/back", Some(json!({}))).await;
    }

    /// Loads the current page again (a form page is requested again with GET, not re-posted).
    pub async fn refresh(&self) {
        self.command(Method::POST, "/refresh", Some(json!({})))
            .await;
    }

    /// The current page's URL.
    pub async fn url(&self) -> String {
        self.command(Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The current page's HTML source.
    pub async fn source(&self) -> String {
        self.command(Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn title(&self) -> String {
        self.command(Method::GET, "/title", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The first element matching `css`, or `None`.
    pub async fn try_find(&self, css: &str) -> Option<Element> {
        let found = self
            .session
            .command(
                Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        match found {
            Ok(value) => Some(self.element(&value, css)),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("find {css:?}: {e}"),
        }
    }

    /// The first element matching `css`; panics (with the page's URL) when there is none.
    pub async fn find(&self, css: &str) -> Element {
        match self.try_find(css).await {
            Some(element) => element,
            None => panic!("no element matches {css:?} on {}", self.url().await),
        }
    }

    /// Every element matching `css`, in document order.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let found = self
            .command(
                Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found
            .as_array()
            .map(|all| all.iter().map(|v| self.element(v, css)).collect())
            .unwrap_or_default()
    }

    pub async fn exists(&self, css: &str) -> bool {
        self.try_find(css).await.is_some()
    }

    fn element(&self, value: &Value, css: &str) -> Element {
        Element {
            session: Arc::clone(&self.session),
            id: value[ELEMENT_KEY]
                .as_str()
                .expect("an element reference")
                .to_string(),
            css: css.to_string(),
        }
    }

    /// Clicks the first element matching `css`. After a click that navigates, wait for something on the
    /// new page (`wait_for`) before looking at it.
    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await;
    }

    /// Types `text` into the first element matching `css` (after what it already holds).
    pub async fn type_into(&self, css: &str, text: &str) {
        self.find(css).await.type_into(text).await;
    }

    /// The rendered text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await
    }

    /// An attribute (or property, as WebDriver resolves it) of the first element matching `css`.
    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        self.find(css).await.attribute(name).await
    }

    /// Runs `script` as a function body with `args` (`arguments[0]`, …) and returns what it returns.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.command(
            Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// The cookies visible to the current page (HttpOnly ones included: WebDriver sees them all).
    pub async fn cookies(&self) -> Vec<Cookie> {
        serde_json::from_value(self.command(Method::GET, "/cookie", None).await)
            .expect("cookies as WebDriver describes them")
    }

    pub async fn cookie(&self, name: &str) -> Option<Cookie> {
        self.cookies().await.into_iter().find(|c| c.name == name)
    }

    pub async fn delete_cookies(&self) {
        self.command(Method::DELETE, "/cookie", None).await;
    }

    /// Waits until an element matches `css` and returns it.
    pub async fn wait_for(&self, css: &str) -> Element {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(element) = self.try_find(css).await {
                return element;
            }
            if Instant::now() >= until {
                panic!(
                    "timed out waiting for {css:?} on {}:\n{}",
                    self.url().await,
                    excerpt(&self.source().await)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until no element matches `css`.
    pub async fn wait_gone(&self, css: &str) {
        self.wait_until(&format!("{css:?} is gone"), || async {
            !self.exists(css).await
        })
        .await;
    }

    /// Waits until the first element matching `css` shows text containing `text`; returns its whole text.
    pub async fn wait_for_text(&self, css: &str, text: &str) -> String {
        let until = Instant::now() + DEADLINE;
        let mut last = None;
        loop {
            if let Some(element) = self.try_find(css).await {
                // the page may change between the find and the read: a stale element is looked up again
                if let Ok(shown) = element.try_text().await {
                    if shown.contains(text) {
                        return shown;
                    }
                    last = Some(shown);
                }
            }
            if Instant::now() >= until {
                panic!(
                    "timed out waiting for {text:?} in {css:?} on {}; it shows {last:?}",
                    self.url().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the current URL contains `part`; returns the URL.
    pub async fn wait_for_url(&self, part: &str) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            let url = self.url().await;
            if url.contains(part) {
                return url;
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for a URL containing {part:?}; it is {url}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until an async condition about the page holds.
    pub async fn wait_until<F, Fut>(&self, what: &str, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let until = Instant::now() + DEADLINE;
        while !condition().await {
            assert!(
                Instant::now() < until,
                "timed out waiting until {what} on {}",
                self.url().await
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Resizes the window (outer size, in CSS pixels).
    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.command(
            Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Saves a PNG of the viewport to `path` (creating its directory).
    pub async fn screenshot(&self, path: &Path) {
        let encoded = self.command(Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a base64 screenshot"))
            .expect("a screenshot in base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the screenshot's directory");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Ends the session and stops the browser now (Drop does the same).
    pub fn quit(self) {}
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Drop cannot await: end the session with a blocking request, which lets chromedriver close
        // chromium cleanly, then kill whatever of the process group is left.
        if let Some(path) = self
            .session
            .base
            .strip_prefix(&format!("http://{}", self.driver_addr))
        {
            let _ = delete_blocking(self.driver_addr, path);
        }
        // the group id is chromedriver's pid (process_group(0))
        unsafe {
            libc::killpg(self.driver.id() as libc::pid_t, libc::SIGKILL);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `DELETE path` over a plain socket, waiting for the answer (a few seconds at most).
fn delete_blocking(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "DELETE {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    // chromedriver keeps the connection open: read up to the end of the body, not to EOF
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        answer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return Ok(());
            }
        }
    }
}

impl Element {
    async fn command(
        &self,
        method: Method,
        what: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        self.session
            .command(method, &format!("/element/{}{what}", self.id), body)
            .await
    }

    pub async fn click(&self) {
        self.command(Method::POST, "/click", Some(json!({})))
            .await
            .unwrap_or_else(|e| panic!("click {:?}: {e}", self.css));
    }

    /// Types `text` after what the field holds.
    pub async fn type_into(&self, text: &str) {
        self.command(Method::POST, "/value", Some(json!({"text": text})))
            .await
            .unwrap_or_else(|e| panic!("type into {:?}: {e}", self.css));
    }

    /// Empties a text field.
    pub async fn clear(&self) {
        self.command(Method::POST, "/clear", Some(json!({})))
            .await
            .unwrap_or_else(|e| panic!("clear {:?}: {e}", self.css));
    }

    pub async fn text(&self) -> String {
        self.try_text()
            .await
            .unwrap_or_else(|e| panic!("text of {:?}: {e}", self.css))
    }

    async fn try_text(&self) -> Result<String, WebDriverError> {
        Ok(self
            .command(Method::GET, "/text", None)
            .await?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// The attribute, or `None` when the element has none.
    pub async fn attribute(&self, name: &str) -> Option<String> {
        self.command(Method::GET, &format!("/attribute/{name}"), None)
            .await
            .unwrap_or_else(|e| panic!("attribute {name} of {:?}: {e}", self.css))
            .as_str()
            .map(str::to_string)
    }

    /// The current value of a DOM property (e.g. `value` of an input as typed, `checked`).
    pub async fn property(&self, name: &str) -> Value {
        self.command(Method::GET, &format!("/property/{name}"), None)
            .await
            .unwrap_or_else(|e| panic!("property {name} of {:?}: {e}", self.css))
    }

    /// Elements matching `css` inside this one.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let found = self
            .command(
                Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await
            .unwrap_or_else(|e| panic!("find {css:?} in {:?}: {e}", self.css));
        found
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|v| Element {
                        session: Arc::clone(&self.session),
                        id: v[ELEMENT_KEY]
                            .as_str()
                            .expect("an element reference")
                            .to_string(),
                        css: format!("{} {css}", self.css),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The start of a page's source, for failure messages.
fn excerpt(source: &str) -> String {
    source.chars().take(2000).collect()
}
