//! Headless Chromium for the job page's tests, driven through chromedriver
//! over the W3C WebDriver protocol: a handful of JSON requests (open a
//! page, run a script, type into an element, click, take a screenshot,
//! read the page's network log), written out here rather than pulled in
//! with a WebDriver crate, whose TLS stack would bring a second crypto
//! provider into every test build.
//!
//! `scripts/setup-browser.sh` installs Debian's `chromium` and
//! `chromium-driver`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session of it; both end when it
/// is dropped.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
}

/// Why no browser could be started.
#[derive(Debug)]
pub struct NoBrowser(pub String);

impl std::fmt::Display for NoBrowser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A program on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a `width` x `height`
    /// window that logs the page's network requests.
    pub async fn start(width: u32, height: u32) -> Result<Browser, NoBrowser> {
        let driver_bin = on_path("chromedriver").ok_or_else(|| {
            NoBrowser("no chromedriver on PATH (scripts/setup-browser.sh installs it)".into())
        })?;
        let chromium = on_path("chromium").ok_or_else(|| {
            NoBrowser("no chromium on PATH (scripts/setup-browser.sh installs it)".into())
        })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| NoBrowser(format!("no free port for chromedriver: {e}")))?
            .port();
        let mut command = Command::new(driver_bin);
        command
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: dropping the browser ends chromedriver and
        // every Chromium process it started, whatever state the test left.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let driver = command
            .spawn()
            .map_err(|e| NoBrowser(format!("chromedriver did not start: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a plain HTTP client builds");
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser {
            driver,
            http,
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = browser
                .http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .and_then(|r| r.status().is_success().then_some(()));
            if ready.is_some() {
                break;
            }
            if Instant::now() > deadline {
                return Err(NoBrowser("chromedriver did not answer within 30 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-background-networking",
                    format!("--window-size={width},{height}"),
                ],
            },
            "goog:loggingPrefs": {"performance": "ALL"},
        }}});
        let answer = browser
            .call("POST", &format!("{base}/session"), Some(capabilities))
            .await
            .map_err(|e| NoBrowser(format!("Chromium did not start a session: {e}")))?;
        let id = answer["sessionId"]
            .as_str()
            .ok_or_else(|| NoBrowser(format!("no session id in {answer}")))?;
        browser.session = format!("{base}/session/{id}");
        Ok(browser)
    }

    /// A browser, or `None` (the test is skipped, saying why) where there
    /// is none and `DISPATCHER_REQUIRE_BROWSER` is not set.
    pub async fn for_test(width: u32, height: u32) -> Option<Browser> {
        match Browser::start(width, height).await {
            Ok(b) => Some(b),
            Err(why) if std::env::var_os("DISPATCHER_REQUIRE_BROWSER").is_none() => {
                eprintln!("skipped: {why}");
                None
            }
            Err(why) => panic!("DISPATCHER_REQUIRE_BROWSER is set and {why}"),
        }
    }

    /// One WebDriver request: its answer's `value`, or the error it names.
    async fn call(&self, method: &str, url: &str, body: Option<Value>) -> Result<Value, String> {
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body.unwrap_or_else(|| json!({}))),
        };
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let answer: Value = response.json().await.map_err(|e| e.to_string())?;
        let value = answer["value"].clone();
        if !status.is_success() {
            return Err(format!(
                "{status}: {} {}",
                value["error"].as_str().unwrap_or(""),
                value["message"].as_str().unwrap_or("")
            ));
        }
        Ok(value)
    }

    async fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.session);
        self.call(method, &url, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    /// Opens `url` (and waits for its load event).
    pub async fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body: `return ...;`) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Runs `script` until it returns something other than `null`/`false`,
    /// for at most `limit`: that value. Panics naming `what` after the limit.
    pub async fn wait_for(&self, what: &str, script: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(script).await;
            if !(v.is_null() || v == Value::Bool(false)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not show {what} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .session_call(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    /// Types `text` into the element `css` selects, as keystrokes.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.session_call("POST", &format!("/element/{id}/click"), None)
            .await;
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let encoded = self.session_call("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a base64 string"))
            .expect("the screenshot decodes");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot's directory");
        }
        std::fs::write(path, png).expect("the screenshot is written");
    }

    /// The URLs the page requested since the last call (Chromium's
    /// performance log: every `Network.requestWillBeSent` of the page).
    pub async fn requested_urls(&self) -> Vec<String> {
        let entries = self
            .session_call("POST", "/se/log", Some(json!({"type": "performance"})))
            .await;
        entries
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| serde_json::from_str::<Value>(e["message"].as_str()?).ok())
            .filter(|m| m["message"]["method"] == "Network.requestWillBeSent")
            .filter_map(|m| {
                Some(
                    m["message"]["params"]["request"]["url"]
                        .as_str()?
                        .to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browser it started.
        crate::send_signal(-(self.driver.id() as i32), libc::SIGKILL);
        let _ = self.driver.wait();
    }
}
