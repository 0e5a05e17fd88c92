// What a real browser sees: headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core;
// never a downloaded browser) against the real sse-gateway binary on 127.0.0.1, with a backend
// double in this process. Run: `cargo build --bin sse-gateway && node --test tests/browser/`
// (after `npm ci --prefix tests/browser`). The binary is found where cargo puts it
// (CARGO_TARGET_DIR, else `cargo metadata`'s target_directory); SSE_GATEWAY_BIN and CHROMIUM_PATH
// override the paths.
//
// Pages must share the gateway's origin (the gateway sends no CORS headers), so every page here is
// the gateway's own demo page, `/_demo/?autoconnect=0` (demo mode with CALLBACK_URL pointing at the
// double below), and scripts open their EventSources from it. Every wait is bounded; no bare sleeps.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { EventEmitter, once } from "node:events";
import { mkdir, mkdtemp, rm, stat, writeFile } from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** Cargo's target directory for this workspace, found the way cargo finds it. */
function targetDir() {
  if (process.env.CARGO_TARGET_DIR) return path.resolve(process.env.CARGO_TARGET_DIR);
  // Also honours `build.target-dir` in a .cargo/config.toml.
  const metadata = execFileSync("cargo", ["metadata", "--format-version", "1", "--no-deps"],
    { cwd: ROOT, encoding: "utf8", maxBuffer: 64 << 20 });
  return JSON.parse(metadata).target_directory;
}

const TARGET = targetDir();
const BIN = process.env.SSE_GATEWAY_BIN ?? path.join(TARGET, "debug/sse-gateway");
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const SCREENSHOT = path.join(TARGET, "browser/demo-page.png");
const BURST_SCREENSHOT = path.join(TARGET, "browser/demo-burst.png");
const GAP_SCREENSHOT = path.join(TARGET, "browser/demo-gap.png");
const SOON = 10_000;
/// Host names that Chromium resolves to 127.0.0.1 (--host-resolver-rules), one origin each, so that
/// 200 streams are not capped by HTTP/1.1's six connections per origin.
const MANY_HOSTS = "sse.test";
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  `--host-resolver-rules=MAP *.${MANY_HOSTS} 127.0.0.1`,
];
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** Resolves `promise`, or rejects after `ms` saying what was awaited. */
function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * The callback side: records every callback; refuses connects to /t/refuse* with 401; puts streams
 * on /t/cluster/* in channel "cluster", and streams on /t/chan/<name>/... in channel <name>.
 */
class Backend extends EventEmitter {
  callbacks = [];

  async start() {
    this.server = http.createServer((req, res) => {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        const callback = JSON.parse(Buffer.concat(chunks).toString("utf8"));
        callback.at = performance.now();
        // The callback URL's query says which gateway called (the cluster test gives each its own).
        callback.path = req.url;
        this.callbacks.push(callback);
        this.emit("callback", callback);
        const refuse = callback.action === "connect" && callback.request.url.startsWith("/t/refuse");
        const cluster = callback.action === "connect" && callback.request.url.startsWith("/t/cluster/");
        const channel = callback.action === "connect" && /^\/t\/chan\/([a-z0-9-]+)\//.exec(callback.request.url);
        res.writeHead(refuse ? 401 : 200, { "content-type": "application/json" });
        res.end(refuse ? '{"error":"not you"}'
          : cluster ? '{"channels":["cluster"]}'
          : channel ? JSON.stringify({ channels: [channel[1]] })
          : "{}");
      });
    });
    this.server.listen(0, "127.0.0.1");
    await once(this.server, "listening");
    this.url = `http://127.0.0.1:${this.server.address().port}/sse-callback`;
  }

  matching(pred) {
    return this.callbacks.filter(pred);
  }

  /** Waits until `count` callbacks match `pred`; returns them. */
  async waitFor(what, pred, count = 1, ms = SOON) {
    if (this.matching(pred).length >= count) return this.matching(pred);
    return within(ms, what, new Promise((resolve) => {
      const check = () => {
        const found = this.matching(pred);
        if (found.length >= count) {
          this.off("callback", check);
          resolve(found);
        }
      };
      this.on("callback", check);
    }));
  }

  connect(url, n = 1) {
    return this.waitFor(`connect #${n} of ${url}`, (c) => c.action === "connect" && c.request.url === url, n)
      .then((found) => found[n - 1]);
  }

  async stop() {
    this.server.closeAllConnections();
    this.server.close();
  }
}

/** The real gateway binary on 127.0.0.1 with PORT=0; `args` e.g. ["demo"]. */
async function startGateway(args, env) {
  await stat(BIN).catch(() => {
    throw new Error(`${BIN} is missing: run \`cargo build --bin sse-gateway\` first (or set SSE_GATEWAY_BIN)`);
  });
  const child = spawn(BIN, args, {
    env: { PATH: process.env.PATH, HOST: "127.0.0.1", PORT: "0", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const log = [];
  const lines = readline.createInterface({ input: child.stderr });
  const address = within(SOON, "the gateway's listener line", new Promise((resolve, reject) => {
    lines.on("line", (line) => {
      log.push(line);
      const m = /public listener on http:\/\/(\S+)/.exec(line);
      if (m) resolve(m[1]);
    });
    child.once("exit", (code) => reject(new Error(`gateway exited (${code}): ${log.join("\n")}`)));
  }));
  const addr = await address;
  return {
    origin: `http://${addr}`,
    port: Number(addr.split(":").pop()),
    log,
    async post(route, body) {
      const answer = await fetch(this.origin + route, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      return { status: answer.status, body: await answer.json() };
    },
    async stop() {
      if (child.exitCode !== null) return;
      const exited = once(child, "exit");
      child.kill("SIGTERM");
      await within(SOON, "the gateway to exit", exited).catch(() => child.kill("SIGKILL"));
    },
  };
}

let context;
let userDataDir;

before(async () => {
  userDataDir = await mkdtemp(path.join(tmpdir(), "sse-gateway-chromium-"));
  // launchPersistentContext passes --user-data-dir: a fresh profile per run.
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: FLAGS,
    viewport: { width: 1200, height: 900 },
  });
});

after(async () => {
  await context?.close();
  if (userDataDir) await rm(userDataDir, { recursive: true, force: true });
});

/** A page at the gateway's origin, with an EventSource on `url` whose every callback is recorded. */
async function pageWithSource(gw, url, names = []) {
  const page = await context.newPage();
  await page.goto(`${gw.origin}/_demo/?autoconnect=0`);
  await page.evaluate(({ url, names }) => {
    const seen = (window.seen = []);
    const es = (window.es = new EventSource(url));
    const t = () => performance.now();
    es.onopen = () => seen.push({ kind: "open", readyState: es.readyState, at: t() });
    es.onerror = () => seen.push({ kind: "error", readyState: es.readyState, at: t() });
    es.onmessage = (e) => seen.push({ kind: "message", type: e.type, data: e.data, lastEventId: e.lastEventId });
    for (const name of names) {
      es.addEventListener(name, (e) =>
        seen.push({ kind: "named", type: e.type, data: e.data, lastEventId: e.lastEventId }));
    }
  }, { url, names });
  return page;
}

/** Waits until the page has recorded something matching `pred` (a function source over `seen`). */
async function waitSeen(page, what, pred, arg) {
  await within(SOON + 1000, what, page.waitForFunction(
    ({ pred, arg }) => new Function("seen", "arg", `return (${pred})(seen, arg)`)(window.seen, arg),
    { pred: pred.toString(), arg },
    { timeout: SOON, polling: 25 },
  ));
  return page.evaluate(() => window.seen);
}

const events = (seen) => seen.filter((s) => s.kind === "message" || s.kind === "named");

describe("a browser against the gateway", () => {
  const backend = new Backend();
  let gw;

  before(async () => {
    await backend.start();
    gw = await startGateway(["demo"], { CALLBACK_URL: backend.url, HEARTBEAT_INTERVAL_SECONDS: "1" });
  });

  after(async () => {
    await gw?.stop();
    await backend.stop();
  });

  test("onmessage gets unnamed events, addEventListener named ones, data as logical lines; heartbeats stay invisible", async () => {
    const url = "/t/basic";
    const page = await context.newPage();
    // Watch the EventSource's bytes at the network layer, to prove heartbeats reached this page.
    const cdp = await context.newCDPSession(page);
    await cdp.send("Network.enable");
    let requestId;
    const chunks = [];
    cdp.on("Network.requestWillBeSent", (e) => {
      if (e.type === "EventSource" && e.request.url.endsWith(url)) requestId = e.requestId;
    });
    cdp.on("Network.dataReceived", (e) => {
      if (e.requestId === requestId) chunks.push(e.dataLength);
    });
    await page.goto(`${gw.origin}/_demo/?autoconnect=0`);
    await page.evaluate(({ url }) => {
      const seen = (window.seen = []);
      const es = (window.es = new EventSource(url));
      es.onopen = () => seen.push({ kind: "open" });
      es.onerror = () => seen.push({ kind: "error", readyState: es.readyState });
      es.onmessage = (e) => seen.push({ kind: "message", type: e.type, data: e.data, lastEventId: e.lastEventId });
      for (const name of ["x", "heartbeat", "comment"]) {
        es.addEventListener(name, (e) => seen.push({ kind: "named", type: e.type, data: e.data, lastEventId: e.lastEventId }));
      }
    }, { url });
    const { token } = await backend.connect(url);
    await waitSeen(page, "open", (seen) => seen.some((s) => s.kind === "open"));

    // Two heartbeats (": heartbeat\n\n", 13 bytes each) arrive at the browser, and nothing fires.
    await within(SOON, "two heartbeats at the browser", new Promise((resolve) => {
      const poll = setInterval(() => {
        if (chunks.filter((n) => n === 13).length >= 2) {
          clearInterval(poll);
          resolve();
        }
      }, 25);
    }));
    assert.deepEqual(await page.evaluate(() => window.seen), [{ kind: "open" }]);

    const sends = [
      { data: "plain" },
      { name: "x", data: "named" },
      { data: "line 1\nline 2\nline 3" },
      { name: "x", data: "crlf 1\r\ncrlf 2\rcr 3" },
      { data: "" },
      { data: "  keeps leading spaces: and colons" },
      { name: "x", data: "end", id: "m-1" },
    ];
    for (const event of sends) {
      const answer = await gw.post("/internal/send", { token, event });
      assert.deepEqual(answer, { status: 200, body: { status: "ok" } });
    }
    const seen = await waitSeen(page, "the last event", (seen) => seen.some((s) => s.data === "end"));
    assert.deepEqual(events(seen), [
      { kind: "message", type: "message", data: "plain", lastEventId: "" },
      { kind: "named", type: "x", data: "named", lastEventId: "" },
      { kind: "message", type: "message", data: "line 1\nline 2\nline 3", lastEventId: "" },
      { kind: "named", type: "x", data: "crlf 1\ncrlf 2\ncr 3", lastEventId: "" },
      { kind: "message", type: "message", data: "", lastEventId: "" },
      { kind: "message", type: "message", data: "  keeps leading spaces: and colons", lastEventId: "" },
      { kind: "named", type: "x", data: "end", lastEventId: "m-1" },
    ]);
    assert.ok(!seen.some((s) => s.kind === "error"), JSON.stringify(seen));
    assert.equal(await page.evaluate(() => window.es.readyState), 1);
    await page.close();
  });

  test("lastEventId follows id; after close: true the browser reconnects after retry ms with Last-Event-ID", async () => {
    const url = "/t/retry";
    const page = await pageWithSource(gw, url);
    const first = await backend.connect(url);
    assert.equal(first.request.headers["last-event-id"], undefined);
    await waitSeen(page, "open", (seen) => seen.some((s) => s.kind === "open"));

    const retryMs = 400;
    let answer = await gw.post("/internal/send", { token: first.token, event: { data: "first", id: "41", retry: retryMs } });
    assert.equal(answer.status, 200);
    answer = await gw.post("/internal/send", { token: first.token, event: { data: "no id here" } });
    assert.equal(answer.status, 200);
    answer = await gw.post("/internal/send", { token: first.token, event: { data: "bye", id: "42" }, close: true });
    assert.deepEqual(answer, { status: 200, body: { status: "ok" } });

    const second = await backend.connect(url, 2);
    assert.equal(second.request.headers["last-event-id"], "42");
    assert.notEqual(second.token, first.token);
    const closed = await backend.waitFor("the first token's disconnect", (c) => c.action === "disconnect" && c.token === first.token);
    assert.equal(closed[0].reason, "server_closed");

    let seen = await waitSeen(page, "the second open", (seen) => seen.filter((s) => s.kind === "open").length === 2);
    assert.deepEqual(events(seen).map((e) => [e.data, e.lastEventId]), [
      ["first", "41"],
      ["no id here", "41"],
      ["bye", "42"],
    ]);
    // The stream's end is an error event with readyState CONNECTING (0): the browser will retry.
    const error = seen.find((s) => s.kind === "error");
    assert.equal(error.readyState, 0);
    const reopened = seen.filter((s) => s.kind === "open")[1];
    const waited = reopened.at - error.at;
    // Chromium's own default is 3000 ms; the retry field made it about 400 ms.
    assert.ok(waited >= retryMs * 0.9 && waited < 2500, `reconnected after ${waited} ms`);

    answer = await gw.post("/internal/send", { token: second.token, event: { data: "after the reconnect" } });
    assert.equal(answer.status, 200);
    seen = await waitSeen(page, "an event on the new stream", (seen) => seen.some((s) => s.data === "after the reconnect"));
    assert.equal(events(seen).at(-1).lastEventId, "42");
    assert.equal(await page.evaluate(() => window.es.readyState), 1);
    await page.close();
  });

  test("a refused connect (backend 401) leaves the EventSource closed (readyState 2)", async () => {
    const url = "/t/refuse";
    const page = await pageWithSource(gw, url);
    const refused = await backend.connect(url);
    const seen = await waitSeen(page, "the error event", (seen) => seen.some((s) => s.kind === "error"));
    assert.deepEqual(seen, [{ kind: "error", readyState: 2, at: seen[0].at }]);
    assert.equal(await page.evaluate(() => window.es.readyState), 2);
    // The refused token is not open and gets no disconnect callback.
    const answer = await gw.post("/internal/send", { token: refused.token, event: { data: "x" } });
    assert.deepEqual(answer, { status: 404, body: { error: "Token not found" } });
    assert.equal(backend.matching((c) => c.token === refused.token).length, 1);
    await page.close();
  });

  test("200 EventSources in one page, over 40 origins, each get their own events", async () => {
    const frames = 40;
    const perFrame = 5; // under HTTP/1.1's 6 connections per origin
    const page = await context.newPage();
    await page.goto(`${gw.origin}/_demo/?autoconnect=0`);
    await page.evaluate(({ frames, hosts, port }) => Promise.all(Array.from({ length: frames }, (_, i) =>
      new Promise((resolve) => {
        const frame = document.createElement("iframe");
        frame.name = `f${i}`;
        frame.width = frame.height = "50";
        frame.onload = resolve;
        frame.src = `http://o${i}.${hosts}:${port}/_demo/?autoconnect=0`;
        document.body.append(frame);
      }))), { frames, hosts: MANY_HOSTS, port: gw.port });
    const byName = new Map(page.frames().map((f) => [f.name(), f]));
    for (let i = 0; i < frames; i++) {
      const frame = byName.get(`f${i}`);
      assert.ok(frame && frame.url().startsWith(`http://o${i}.${MANY_HOSTS}:`), `frame ${i}`);
      await frame.evaluate(({ i, perFrame }) => {
        window.got = Array.from({ length: perFrame }, () => []);
        window.sources = window.got.map((got, j) => {
          const es = new EventSource(`/t/many/${i}/${j}`);
          es.onmessage = (e) => got.push(e.data);
          return es;
        });
      }, { i, perFrame });
    }

    const total = frames * perFrame;
    const connects = await backend.waitFor(`${total} connects`, (c) => c.action === "connect" && c.request.url.startsWith("/t/many/"), total, 30_000);
    assert.equal(connects.length, total);
    // Each stream gets an event naming its own URL; nothing else.
    const queue = [...connects];
    await Promise.all(Array.from({ length: 16 }, async () => {
      for (let c = queue.shift(); c; c = queue.shift()) {
        const answer = await gw.post("/internal/send", { token: c.token, event: { data: `for ${c.request.url}` } });
        assert.equal(answer.status, 200, c.request.url);
      }
    }));
    for (let i = 0; i < frames; i++) {
      const frame = byName.get(`f${i}`);
      await within(SOON + 1000, `frame ${i}'s events`, frame.waitForFunction(
        () => window.got.every((g) => g.length >= 1), null, { timeout: SOON, polling: 25 }));
      const got = await frame.evaluate(() => window.got);
      assert.deepEqual(got, Array.from({ length: perFrame }, (_, j) => [`for /t/many/${i}/${j}`]));
      assert.deepEqual(await frame.evaluate(() => window.sources.map((s) => s.readyState)), Array(perFrame).fill(1));
    }
    const origins = new Set(connects.map((c) => c.request.headers.host.split(":")[0]));
    assert.equal(origins.size, frames);
    await page.close();
  });
});

// --- Last-Event-ID resume (PROTOCOL §11) ---------------------------------------------------------

/** A gateway position `<epoch>-<seq>-<ms>` (§11.1), split (the epoch could hold hyphens itself). */
function position(id) {
  const m = /^(.+)-(\d+)-(\d+)$/.exec(id);
  assert.ok(m, `${JSON.stringify(id)} is not a gateway position <epoch>-<seq>-<ms>`);
  return { epoch: m[1], seq: BigInt(m[2]), ms: Number(m[3]) };
}

/** Asserts that `ids` are gateway positions of one epoch, in strictly increasing seq order. */
function assertPositionsIncrease(ids) {
  const positions = ids.map(position);
  for (let i = 1; i < positions.length; i++) {
    assert.equal(positions[i].epoch, positions[0].epoch, `one epoch: ${ids}`);
    assert.ok(positions[i].seq > positions[i - 1].seq, `seq increases: ${ids}`);
    assert.ok(positions[i].ms >= positions[i - 1].ms, `ms never goes back: ${ids}`);
  }
}

/** `sse_gateway_resumes_total{result="<result>"}` on `gw`. */
async function resumes(gw, result) {
  const text = await (await fetch(`${gw.origin}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`sse_gateway_resumes_total{result="${result}"} `));
  assert.ok(line, `no sse_gateway_resumes_total{result="${result}"} in /metrics`);
  return Number(line.split(" ").pop());
}

const kinds = (seen) => seen.map((s) => s.kind);
const dataAndIds = (list) => list.map((e) => [e.data, e.lastEventId]);

describe("Last-Event-ID resume in a browser (PROTOCOL §11)", () => {
  const backend = new Backend();
  let gw;
  // Two events kept per channel: two publishes missed resume exactly, three are a gap.
  const KEPT = 2;
  // How long the page stays away after its stream ends: the test publishes meanwhile.
  const RETRY_MS = 1500;

  before(async () => {
    await backend.start();
    gw = await startGateway(["demo"], { CALLBACK_URL: backend.url, HISTORY_SIZE: String(KEPT) });
  });

  after(async () => {
    await gw?.stop();
    await backend.stop();
  });

  /**
   * A page whose EventSource (`window.es`, recording into `window.seen`) is in `channel` and has
   * seen one published event, `before`; then the gateway ends that stream, after telling the
   * browser to wait RETRY_MS before it reconnects. The same page holds a second EventSource in the
   * channel that never leaves (`window.watched`): what a page that stayed got, ids included.
   * Resolves once the page saw its stream end.
   */
  async function pageThenAway(channel) {
    const url = `/t/chan/${channel}/page`;
    const watchUrl = `/t/chan/${channel}/watch`;
    const page = await pageWithSource(gw, url, ["gateway.gap"]);
    const first = await backend.connect(url);
    assert.equal(first.request.headers["last-event-id"], undefined);
    await waitSeen(page, "open", (seen) => seen.some((s) => s.kind === "open"));
    await page.evaluate((watchUrl) => {
      const watched = (window.watched = []);
      window.watch = new EventSource(watchUrl);
      window.watch.onmessage = (e) => watched.push({ data: e.data, lastEventId: e.lastEventId });
    }, watchUrl);
    await backend.connect(watchUrl);
    await page.waitForFunction(() => window.watch.readyState === 1, null, { timeout: SOON });

    // A send without an id leaves the page's position where it is (§11.1); its retry stays.
    let answer = await gw.post("/internal/send", { token: first.token, event: { data: "slow retry", retry: RETRY_MS } });
    assert.deepEqual(answer, { status: 200, body: { status: "ok" } });
    answer = await gw.post("/internal/publish", { channel, event: { data: "before" } });
    assert.deepEqual(answer, { status: 200, body: { status: "ok", delivered: 2 } });
    const seen = await waitSeen(page, "the event published before", (seen) => seen.some((s) => s.data === "before"));
    const before = events(seen).at(-1).lastEventId;
    position(before);

    answer = await gw.post("/internal/send", { token: first.token, close: true });
    assert.deepEqual(answer, { status: 200, body: { status: "ok" } });
    const closed = await backend.waitFor("the first stream's disconnect", (c) => c.action === "disconnect" && c.token === first.token);
    assert.equal(closed[0].reason, "server_closed");
    await waitSeen(page, "the end of the stream", (seen) => seen.some((s) => s.kind === "error"));
    return { page, url, before };
  }

  test("a page that reconnects by itself gets what was published while it was away: in order, once, with the gateway's ids", async () => {
    const channel = "resume";
    const complete = await resumes(gw, "complete");
    const { page, url, before } = await pageThenAway(channel);
    // While the page is away: only the watcher is in the channel.
    for (const data of ["missed 1", "missed 2"]) {
      const answer = await gw.post("/internal/publish", { channel, event: { data } });
      assert.deepEqual(answer, { status: 200, body: { status: "ok", delivered: 1 } });
    }
    const published = performance.now();

    // The browser comes back by itself, after the publishes, with the last id it saw.
    const second = await backend.connect(url, 2);
    assert.ok(second.at > published, "the page reconnected before both publishes were done: nothing was missed");
    assert.equal(second.request.headers["last-event-id"], before);
    assert.equal(second.request.url, url);
    await waitSeen(page, "the second open", (seen) => seen.filter((s) => s.kind === "open").length === 2);
    const answer = await gw.post("/internal/publish", { channel, event: { data: "live" } });
    assert.deepEqual(answer, { status: 200, body: { status: "ok", delivered: 2 } });
    const seen = await waitSeen(page, "the live event", (seen) => seen.some((s) => s.data === "live"));
    await page.waitForFunction(() => window.watched.length === 4, null, { timeout: SOON });
    const watched = await page.evaluate(() => window.watched);

    // The watcher saw every publish live, with the ids the gateway gave them.
    assert.deepEqual(watched.map((e) => e.data), ["before", "missed 1", "missed 2", "live"]);
    assertPositionsIncrease(watched.map((e) => e.lastEventId));
    assert.equal(watched[0].lastEventId, before);
    // The page: the two missed events right after its reconnect, before the live one, each once,
    // each with the very id the watcher got.
    assert.deepEqual(kinds(seen), ["open", "message", "message", "error", "open", "message", "message", "message"]);
    // The per-token send has no id of its own: the page's id is still the position its stream
    // started at (an id-only block the gateway sends first), before any publish it saw.
    const [retry, ...rest] = dataAndIds(events(seen));
    assert.equal(retry[0], "slow retry");
    const start = position(retry[1]);
    const firstPublish = position(watched[0].lastEventId);
    assert.ok(start.epoch === firstPublish.epoch && start.seq < firstPublish.seq, `start ${retry[1]} before ${watched[0].lastEventId}`);
    assert.deepEqual(rest, dataAndIds(watched));
    assert.equal(seen[3].readyState, 0);
    assert.equal(await page.evaluate(() => window.es.readyState), 1);
    assert.equal(await resumes(gw, "complete"), complete + 1);
    await page.close();
  });

  test("a page away for longer than the history keeps gets gateway.gap first, then live events", async () => {
    const channel = "gap";
    const gaps = await resumes(gw, "gap");
    const { page, url, before } = await pageThenAway(channel);
    // One more than the channel keeps: the first of them is gone when the page comes back.
    for (const data of ["lost 1", "lost 2", "lost 3"]) {
      const answer = await gw.post("/internal/publish", { channel, event: { data } });
      assert.deepEqual(answer, { status: 200, body: { status: "ok", delivered: 1 } });
    }
    const published = performance.now();

    const second = await backend.connect(url, 2);
    assert.ok(second.at > published, "the page reconnected before the publishes were done");
    assert.equal(second.request.headers["last-event-id"], before);
    await waitSeen(page, "the gap event", (seen) => seen.some((s) => s.type === "gateway.gap"));
    const answer = await gw.post("/internal/publish", { channel, event: { data: "live" } });
    assert.deepEqual(answer, { status: 200, body: { status: "ok", delivered: 2 } });
    const seen = await waitSeen(page, "the live event", (seen) => seen.some((s) => s.data === "live"));
    await page.waitForFunction(() => window.watched.length === 5, null, { timeout: SOON });
    const watched = await page.evaluate(() => window.watched);
    assert.deepEqual(watched.map((e) => e.data), ["before", "lost 1", "lost 2", "lost 3", "live"]);
    assertPositionsIncrease(watched.map((e) => e.lastEventId));

    // Nothing of what was lost, no partial replay: the gap, then the live event.
    assert.deepEqual(kinds(seen), ["open", "message", "message", "error", "open", "named", "message"]);
    const [, , gap, live] = events(seen);
    assert.equal(gap.type, "gateway.gap");
    assert.deepEqual(JSON.parse(gap.data), { last_event_id: before });
    // Its id is the current position (at or after the last publish, before the live one), so
    // the browser resumes from there next time.
    const [lost, at, next] = [watched[3].lastEventId, gap.lastEventId, watched[4].lastEventId].map(position);
    assert.ok(at.epoch === lost.epoch && at.seq >= lost.seq && at.seq < next.seq,
      `gap id ${gap.lastEventId} between ${watched[3].lastEventId} and ${watched[4].lastEventId}`);
    assert.deepEqual([live.data, live.lastEventId], ["live", watched[4].lastEventId]);
    assert.equal(await page.evaluate(() => window.es.readyState), 1);
    assert.equal(await resumes(gw, "gap"), gaps + 1);
    await page.close();
  });
});

describe("the demo page", () => {
  let gw;

  before(async () => {
    // Demo mode as a newcomer runs it: the built-in backend, no CALLBACK_URL.
    gw = await startGateway(["demo"], {});
  });

  after(async () => {
    await gw?.stop();
  });

  test("shows its stream, sends to itself and publishes to channel demo; screenshot in target/browser/", async () => {
    const other = await context.newPage();
    await other.goto(`${gw.origin}/_demo/`);
    const page = await context.newPage();
    await page.goto(`${gw.origin}/_demo/`);
    for (const p of [page, other]) {
      await p.waitForSelector('#state[data-state="open"]', { timeout: SOON });
      await p.waitForFunction((uuid) => new RegExp(uuid).test(document.getElementById("token").textContent),
        UUID.source, { timeout: SOON });
    }
    const token = await page.textContent("#token");
    assert.notEqual(token, await other.textContent("#token"));

    // A named, multi-line event with an id, to this page only.
    await page.fill("#f-name", "greeting");
    await page.fill("#f-id", "demo-1");
    await page.fill("#f-data", "Hello from Chromium\nsecond line");
    await page.click("#send-me");
    await page.waitForSelector('#answer[data-status="200"]', { timeout: SOON });
    assert.match(await page.textContent("#answer"), /^200 \{"status":"ok"\}/);
    assert.equal(JSON.parse((await page.textContent("#request")).split("\n").slice(1).join("\n")).token, token);
    const first = page.locator("#log li.event").first();
    await first.waitFor({ timeout: SOON });
    assert.equal(await first.getAttribute("data-type"), "greeting");
    assert.equal(await first.locator("pre.data").textContent(), "Hello from Chromium\nsecond line");
    assert.equal(await page.textContent("#last-event-id"), "demo-1");

    // A name the page had no listener for: sending it adds one.
    await page.fill("#f-name", "custom-name");
    await page.fill("#f-id", "");
    await page.fill("#f-data", "seen through a listener the form added");
    await page.click("#send-me");
    await page.waitForSelector('#answer[data-status="200"]', { timeout: SOON });
    await page.waitForSelector('#log li.event[data-type="custom-name"]', { timeout: SOON });

    // Publish to channel demo (the built-in backend put both pages in it): both get it.
    await page.fill("#f-name", "");
    await page.fill("#f-data", "to every demo page");
    await page.click("#publish");
    await page.waitForFunction(() => /^\d{3}$/.test(document.getElementById("answer").dataset.status ?? ""), null, { timeout: SOON });
    assert.equal(await page.getAttribute("#answer", "data-status"), "200");
    assert.equal(await page.textContent("#answer"), '200 {"status":"ok","delivered":2}');
    for (const p of [page, other]) {
      await p.waitForFunction(() => [...document.querySelectorAll("#log li.event pre.data")]
        .some((e) => e.textContent === "to every demo page"), null, { timeout: SOON });
    }
    assert.equal(await other.locator("#log li.event").count(), 1);
    assert.equal(await page.textContent("#count"), "3");

    await mkdir(path.dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    assert.ok((await stat(SCREENSHOT)).size > 10_000);

    // close: true ends the stream; the browser reconnects and the page learns its new token.
    await page.fill("#f-data", "last one");
    await page.check("#f-close");
    await page.click("#send-me");
    await page.waitForFunction(({ old, uuid }) => {
      const now = document.getElementById("token").textContent;
      return now !== old && new RegExp(uuid).test(now);
    }, { old: token, uuid: UUID.source }, { timeout: SOON });
    assert.equal(await page.getAttribute("#state", "data-state"), "open");
    await page.close();
    await other.close();
  });

  test("a 7th stream on one origin waits: the page says why, and its answer box gives up after 5 s", async () => {
    const page = await context.newPage();
    await page.goto(`${gw.origin}/_demo/?autoconnect=0`);
    // Six streams from this page take every HTTP/1.1 connection Chromium allows this origin.
    await page.evaluate(() => {
      window.held = Array.from({ length: 6 }, (_, i) => new EventSource(`/t/held/${i}`));
    });
    await page.waitForFunction(() => window.held.every((s) => s.readyState === 1), null, { timeout: SOON });
    assert.equal(await page.isVisible("#stalled"), false);

    // The page's own stream is the 7th: it waits, and after a few seconds the page says why.
    await page.click("#connect");
    await page.waitForSelector("#stalled", { state: "visible", timeout: SOON });
    assert.match(await page.textContent("#stalled"), /6 connections per origin/);
    assert.equal(await page.getAttribute("#state", "data-state"), "connecting");

    // A send waits for a connection too; the answer box gives up instead of hanging.
    const sent = Date.now();
    await page.click("#send-me");
    assert.equal(await page.textContent("#answer"), "...");
    await page.waitForSelector('#answer[data-status="timeout"]', { timeout: SOON });
    const waited = Date.now() - sent;
    assert.ok(waited >= 4500 && waited < 9000, `gave up after ${waited} ms`);
    assert.match(await page.textContent("#answer"), /^no answer within 5 s/);
    assert.equal(await page.getAttribute("#answer", "data-ok"), "false");

    // One stream closes: the 7th opens and the note goes away.
    await page.evaluate(() => window.held[0].close());
    await page.waitForSelector('#state[data-state="open"]', { timeout: SOON });
    await page.waitForSelector("#stalled", { state: "hidden", timeout: SOON });
    await page.evaluate(() => window.held.forEach((s) => s.close()));
    await page.close();
  });
  test("the live panel follows /metrics, and a burst of 1000 publishes shows in it; screenshot in target/browser/", async () => {
    const page = await context.newPage();
    await page.goto(`${gw.origin}/_demo/`);
    await page.waitForSelector('#state[data-state="open"]', { timeout: SOON });
    const number = async (id) => Number(await page.textContent(id));
    // The panel scrapes once a second: it sees this page's stream, then has a rate to show.
    await page.waitForFunction(() => Number(document.getElementById("m-streams").textContent) >= 1, null, { timeout: SOON });
    await page.waitForFunction(() => document.getElementById("m-events").textContent !== "-", null, { timeout: SOON });
    assert.equal(await page.getAttribute("#m-status", "data-state"), "ok");
    const eventsBefore = await number("#m-events-total");
    const deliveriesBefore = await number("#m-deliveries-total");

    await page.click("#burst");
    await page.waitForSelector('#burst-status[data-state="done"], #burst-status[data-state="failed"]', { timeout: 60_000 });
    const status = await page.textContent("#burst-status");
    assert.match(status, /^1000 published in [\d.]+ s, \d+ deliveries$/);
    // Every burst event reached this page's stream (named "burst": counted, not listed).
    await page.waitForFunction(() => document.getElementById("burst-received").textContent === "1000", null, { timeout: SOON });
    assert.equal(await page.locator('#log li.event').count(), 0);

    // The panel's numbers moved with the burst: totals up by 1000 and more, a rate seen in the peaks.
    await page.waitForFunction(({ events, deliveries }) =>
      Number(document.getElementById("m-events-total").textContent) >= events + 1000 &&
      Number(document.getElementById("m-deliveries-total").textContent) >= deliveries + 1000,
    { events: eventsBefore, deliveries: deliveriesBefore }, { timeout: SOON });
    assert.ok(await number("#m-events-peak") > 0, await page.textContent("#live"));
    assert.ok(await number("#m-deliveries-peak") > 0, await page.textContent("#live"));
    // The deliveries/s chart drew the burst: a point well above its baseline.
    const ys = (await page.getAttribute("#c-deliveries polyline", "points"))
      .split(" ").map((p) => Number(p.split(",")[1]));
    assert.ok(ys.length >= 2 && Math.min(...ys) < 30, `points ${ys}`);

    await mkdir(path.dirname(BURST_SCREENSHOT), { recursive: true });
    await page.screenshot({ path: BURST_SCREENSHOT, fullPage: true });
    assert.ok((await stat(BURST_SCREENSHOT)).size > 10_000);
    await page.close();
  });

  /** The demo page's received list, oldest first: [type, data, lastEventId] each. */
  const listed = (page) => page.$$eval("#log li.event", (items) => items.reverse()
    .map((li) => [li.dataset.type, li.querySelector("pre.data").textContent, li.dataset.lastEventId]));

  /** Publishes `data` to channel demo with the page's own form and button; asserts the 200. */
  async function publishFromPage(page, data) {
    await page.fill("#f-name", "");
    await page.fill("#f-id", "");
    await page.fill("#f-data", data);
    await page.click("#publish");
    await page.waitForFunction(() => /^\d{3}$/.test(document.getElementById("answer").dataset.status ?? ""), null, { timeout: SOON });
    assert.equal(await page.getAttribute("#answer", "data-status"), "200", await page.textContent("#answer"));
  }

  /** Waits until the page listed an event with `data`. */
  function listedSoon(page, data) {
    return page.waitForFunction((data) => [...document.querySelectorAll("#log li.event pre.data")]
      .some((e) => e.textContent === data), data, { timeout: SOON });
  }

  /** A demo page with its stream open that has seen one published event; resolves with its id. */
  async function demoPageWithPosition(origin) {
    const page = await context.newPage();
    await page.goto(`${origin}/_demo/`);
    await page.waitForSelector('#state[data-state="open"]', { timeout: SOON });
    assert.equal(await page.textContent("#connect"), "Connect");
    await publishFromPage(page, "before");
    await listedSoon(page, "before");
    const before = await page.textContent("#last-event-id");
    position(before);
    assert.deepEqual(await listed(page), [["message", "before", before]]);
    assert.match(await page.textContent("#connect"), /^Reconnect/);
    return { page, before };
  }

  test("resume: Disconnect, publish twice from the page, Reconnect; both arrive, in order, once", async () => {
    const { page, before } = await demoPageWithPosition(gw.origin);
    const streamUrl = await page.textContent("#stream-url");
    assert.match(streamUrl, /^\/demo\/stream\?demo_id=[0-9a-f]{24}$/);

    await page.click("#disconnect");
    assert.equal(await page.getAttribute("#state", "data-state"), "closed");
    await publishFromPage(page, "away 1");
    await publishFromPage(page, "away 2");

    await page.click("#connect");
    // A new EventSource: the position rides in the query, next to the page's demo_id.
    assert.equal(await page.textContent("#stream-url"), `${streamUrl}&last_event_id=${encodeURIComponent(before)}`);
    await page.waitForSelector('#state[data-state="open"]', { timeout: SOON });
    await listedSoon(page, "away 2");
    // The page knows its new stream's token (the built-in backend found demo_id in the new URL).
    await page.waitForFunction((uuid) => new RegExp(uuid).test(document.getElementById("token").textContent),
      UUID.source, { timeout: SOON });
    await publishFromPage(page, "live");
    await listedSoon(page, "live");

    const list = await listed(page);
    assert.deepEqual(list.map(([type, data]) => [type, data]),
      [["message", "before"], ["message", "away 1"], ["message", "away 2"], ["message", "live"]]);
    assert.equal(list[0][2], before);
    assertPositionsIncrease(list.map(([, , id]) => id));
    assert.equal(await page.textContent("#last-event-id"), list[3][2]);
    assert.equal(await page.textContent("#count"), "4");
    assert.equal(await page.isVisible("#gap"), false);

    // The gateway ends this stream: the browser reconnects by itself on the same URL, whose
    // last_event_id is stale by now, but its Last-Event-ID header (the id of "live") wins: nothing twice.
    const token = await page.textContent("#token");
    await page.fill("#f-data", "bye");
    await page.check("#f-close");
    await page.click("#send-me");
    await page.waitForSelector('#answer[data-status="200"]', { timeout: SOON });
    await page.uncheck("#f-close");
    await page.waitForFunction(({ old, uuid }) => {
      const now = document.getElementById("token").textContent;
      return now !== old && new RegExp(uuid).test(now);
    }, { old: token, uuid: UUID.source }, { timeout: SOON });
    await publishFromPage(page, "after the browser's own reconnect");
    await listedSoon(page, "after the browser's own reconnect");
    const after = await listed(page);
    assert.deepEqual(after.map(([, data]) => data),
      ["before", "away 1", "away 2", "live", "bye", "after the browser's own reconnect"]);
    assertPositionsIncrease([list[3][2], after[5][2]]);
    assert.equal(await page.isVisible("#gap"), false);
    await page.close();
  });

  test("a gap: Disconnect, a burst of more events than the history keeps, Reconnect; the page says to reload; screenshot in target/browser/", async () => {
    const { page, before } = await demoPageWithPosition(gw.origin);
    assert.equal(await page.isVisible("#gap"), false);
    await page.click("#disconnect");
    // 1000 events to channel demo while away: the demo keeps 100, so most are gone.
    await page.click("#burst");
    await page.waitForSelector('#burst-status[data-state="done"], #burst-status[data-state="failed"]', { timeout: 60_000 });
    assert.match(await page.textContent("#burst-status"), /^1000 published/);

    await page.click("#connect");
    await page.waitForSelector("#gap", { state: "visible", timeout: SOON });
    assert.match(await page.textContent("#gap"), /missed events: reload your state/);
    assert.equal(await page.textContent("#gap-from"), JSON.stringify(before));
    // The gap event is listed; nothing of the burst came back (no partial replay).
    let list = await listed(page);
    assert.equal(list.length, 2, JSON.stringify(list));
    const [type, data, gapId] = list[1];
    assert.equal(type, "gateway.gap");
    assert.deepEqual(JSON.parse(data), { last_event_id: before });
    assertPositionsIncrease([before, gapId]);
    assert.equal(await page.textContent("#last-event-id"), gapId);
    assert.equal(await page.textContent("#burst-received"), "0");

    // Live events follow the gap.
    await publishFromPage(page, "after the gap");
    await listedSoon(page, "after the gap");
    list = await listed(page);
    assert.equal(list.length, 3);
    assertPositionsIncrease([gapId, list[2][2]]);
    await mkdir(path.dirname(GAP_SCREENSHOT), { recursive: true });
    await page.screenshot({ path: GAP_SCREENSHOT, fullPage: true });

    // Reloading the state (here: starting the list over) puts the notice away.
    await page.click("#gap-reload");
    assert.equal(await page.isVisible("#gap"), false);
    assert.equal(await page.locator("#log li.event").count(), 0);
    await page.close();
  });

  test("a gap after the history's TTL: away for longer than HISTORY_TTL_SECONDS, the page says to reload", async () => {
    // The demo's 60 s, shortened to 1 s (the operator's environment wins over the demo's defaults).
    const short = await startGateway(["demo"], { HISTORY_TTL_SECONDS: "1" });
    try {
      const { page, before } = await demoPageWithPosition(short.origin);
      await page.click("#disconnect");
      await publishFromPage(page, "expires while away");
      // Synchronise on the expiry itself: the history holds nothing once both events are dropped.
      await until("the history to expire", async () => (await metric(short, "sse_gateway_history_bytes")) === 0);
      await page.click("#connect");
      await page.waitForSelector("#gap", { state: "visible", timeout: SOON });
      assert.equal(await page.textContent("#gap-from"), JSON.stringify(before));
      const list = await listed(page);
      assert.deepEqual(list.map(([type]) => type), ["message", "gateway.gap"]);
      assert.ok(!list.some(([, data]) => data === "expires while away"));
      await page.close();
    } finally {
      await short.stop();
    }
  });
});

// --- Several gateways, one deployment (PROTOCOL §10) -------------------------------------------

const REDIS_SERVER = process.env.REDIS_SERVER ?? "/usr/bin/redis-server";
const NGINX = process.env.NGINX_PATH ?? "/usr/sbin/nginx";

/** A port that was free on 127.0.0.1 a moment ago. */
async function freePort() {
  const server = net.createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** One Redis command (RESP, raw TCP); resolves with the reply's first line, rejects on error. */
function redisCommand(port, args, ms = 500) {
  return within(ms, `redis ${args.join(" ")}`, new Promise((resolve, reject) => {
    const sock = net.connect(port, "127.0.0.1");
    let got = "";
    sock.on("error", reject);
    sock.on("data", (d) => {
      got += d.toString("latin1");
      const end = got.indexOf("\r\n");
      if (end >= 0) {
        sock.destroy();
        resolve(got.slice(0, end));
      }
    });
    sock.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join("")}`);
  }));
}

/** Polls `check` (an async function returning truthy when done) every 25 ms for `ms`. */
async function until(what, check, ms = SOON) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const done = await check();
      if (done) return done;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last.message}` : ""}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/** Debian's redis-server on a free port, no persistence, files in `dir`. */
async function startRedis(dir) {
  await stat(REDIS_SERVER).catch(() => {
    throw new Error(`${REDIS_SERVER} is missing: apt-get install redis-server (or run: bash .ci/run)`);
  });
  const port = await freePort();
  const child = spawn(REDIS_SERVER, [
    "--bind", "127.0.0.1", "--port", String(port), "--save", "", "--appendonly", "no",
    "--protected-mode", "no", "--dir", dir, "--logfile", path.join(dir, "redis.log"),
  ], { stdio: "ignore" });
  let exited = null;
  child.once("exit", (code, signal) => { exited = code ?? signal; });
  await until("redis-server to answer PING", async () => {
    if (exited !== null) throw new Error(`redis-server exited (${exited})`);
    return (await redisCommand(port, ["PING"])) === "+PONG";
  });
  return {
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const gone = once(child, "exit");
      child.kill("SIGKILL");
      await gone;
    },
  };
}

/**
 * Debian's nginx in its own prefix `dir`, in the foreground as one process, round-robin over
 * `upstreams` (host:port), with the project's proxy settings for streams (deploy/nginx.conf). It
 * serves one static page itself, `/page`, so that pages share the proxy's origin with their streams.
 */
async function startNginx(dir, upstreams) {
  await stat(NGINX).catch(() => {
    throw new Error(`${NGINX} is missing: apt-get install nginx-light (or run: bash .ci/run)`);
  });
  const port = await freePort();
  const conf = `master_process off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log info;
events { worker_connections 256; }
http {
    access_log ${dir}/access.log;
    client_body_temp_path ${dir}/body;
    proxy_temp_path ${dir}/proxy;
    fastcgi_temp_path ${dir}/fastcgi;
    uwsgi_temp_path ${dir}/uwsgi;
    scgi_temp_path ${dir}/scgi;
    upstream sse_gateway {
${upstreams.map((a) => `        server ${a};`).join("\n")}
        keepalive 16;
    }
    server {
        listen 127.0.0.1:${port};
        location = /page {
            default_type text/html;
            return 200 "<!doctype html><title>two gateways</title><p>two gateways behind nginx</p>";
        }
        location = /favicon.ico { return 204; }
        location /internal/ { return 404; }
        location = /metrics { return 404; }
        location / {
            proxy_pass http://sse_gateway;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            gzip off;
        }
    }
}
`;
  const file = path.join(dir, "nginx.conf");
  await writeFile(file, conf);
  const child = spawn(NGINX, ["-p", dir, "-e", path.join(dir, "error.log"), "-c", file, "-g", "daemon off;"],
    { stdio: ["ignore", "ignore", "pipe"] });
  const stderr = [];
  child.stderr.on("data", (d) => stderr.push(d.toString()));
  let exited = null;
  child.once("exit", (code, signal) => { exited = code ?? signal; });
  const origin = `http://127.0.0.1:${port}`;
  await until("nginx to serve /page", async () => {
    if (exited !== null) throw new Error(`nginx exited (${exited}): ${stderr.join("")}`);
    return (await fetch(`${origin}/page`)).status === 200;
  });
  return {
    origin,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const gone = once(child, "exit");
      child.kill("SIGTERM");
      await within(SOON, "nginx to exit", gone).catch(() => child.kill("SIGKILL"));
    },
  };
}

/** A sample of the gateway's /metrics (first series named `name`), or undefined. */
async function metric(gw, name) {
  const text = await (await fetch(`${gw.origin}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `) || l.startsWith(`${name}{`));
  return line === undefined ? undefined : Number(line.split(" ").pop());
}

describe("two gateways joined by Redis behind nginx (PROTOCOL §10)", () => {
  const backend = new Backend();
  const gateways = [];
  let dir;
  let redis;
  let nginx;

  before(async () => {
    dir = await mkdtemp(path.join(tmpdir(), "sse-gateway-cluster-"));
    await backend.start();
    redis = await startRedis(dir);
    for (const node of ["A", "B"]) {
      const gw = await startGateway([], {
        CALLBACK_URL: `${backend.url}?node=${node}`,
        REDIS_URL: redis.url,
        HEARTBEAT_INTERVAL_SECONDS: "1",
      });
      gw.node = node;
      gateways.push(gw);
    }
    for (const gw of gateways) {
      await until(`gateway ${gw.node} to join a cluster of 2`, async () => {
        const ready = await fetch(`${gw.origin}/readyz`);
        return ready.status === 200 && (await metric(gw, "sse_gateway_cluster_nodes")) === 2;
      });
    }
    nginx = await startNginx(dir, gateways.map((gw) => new URL(gw.origin).host));
  });

  after(async () => {
    await nginx?.stop();
    for (const gw of gateways) await gw.stop();
    await redis?.stop();
    await backend.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  /** A page at nginx's origin with an EventSource on `url`; resolves with the node that holds it. */
  async function pageThroughProxy(url) {
    const page = await context.newPage();
    await page.goto(`${nginx.origin}/page`);
    await page.evaluate((url) => {
      const seen = (window.seen = []);
      const es = (window.es = new EventSource(url));
      es.onopen = () => seen.push({ kind: "open" });
      es.onerror = () => seen.push({ kind: "error", readyState: es.readyState });
      es.onmessage = (e) => seen.push({ kind: "message", type: e.type, data: e.data, lastEventId: e.lastEventId });
    }, url);
    const connect = await backend.connect(url);
    await waitSeen(page, `the stream ${url} open`, (seen) => seen.some((s) => s.kind === "open"));
    const node = new URL(connect.path, "http://callback").searchParams.get("node");
    return { page, url, node, token: connect.token };
  }

  test("two pages on different nodes behind one nginx: one publish reaches both, once", async () => {
    const first = await pageThroughProxy("/t/cluster/0");
    let second;
    // Round-robin puts the next stream on the other node; retry (bounded) should it not.
    for (let attempt = 1; attempt <= 6 && !second; attempt++) {
      const candidate = await pageThroughProxy(`/t/cluster/${attempt}`);
      if (candidate.node !== first.node) {
        second = candidate;
      } else {
        await candidate.page.close();
        await backend.waitFor(`the disconnect of ${candidate.url}`,
          (c) => c.action === "disconnect" && c.token === candidate.token);
      }
    }
    assert.ok(second, `every stream landed on node ${first.node}`);
    assert.deepEqual(new Set([first.node, second.node]), new Set(["A", "B"]));
    // Each gateway holds one of them.
    for (const gw of gateways) {
      await until(`gateway ${gw.node} to hold one stream`,
        async () => (await metric(gw, "sse_gateway_connections")) === 1);
    }

    // One publish, through either node, reaches both pages, once each.
    const answer = await gateways[0].post("/internal/publish", { channel: "cluster", event: { data: "to both pages", id: "c-1" } });
    assert.deepEqual(answer, { status: 200, body: { status: "ok", delivered: 2 } });
    for (const { page } of [first, second]) {
      await waitSeen(page, "the published event", (seen) => seen.some((s) => s.data === "to both pages"));
    }
    // A send by token through the node that does not hold the stream.
    const holderOfFirst = gateways.find((gw) => gw.node === first.node);
    const other = gateways.find((gw) => gw !== holderOfFirst);
    const sent = await other.post("/internal/send", { token: first.token, event: { data: "by token, via the other node" } });
    assert.deepEqual(sent, { status: 200, body: { status: "ok" } });
    await waitSeen(first.page, "the forwarded send", (seen) => seen.some((s) => s.data === "by token, via the other node"));

    assert.deepEqual(events(await first.page.evaluate(() => window.seen)), [
      { kind: "message", type: "message", data: "to both pages", lastEventId: "c-1" },
      { kind: "message", type: "message", data: "by token, via the other node", lastEventId: "c-1" },
    ]);
    assert.deepEqual(events(await second.page.evaluate(() => window.seen)), [
      { kind: "message", type: "message", data: "to both pages", lastEventId: "c-1" },
    ]);
    for (const { page } of [first, second]) {
      assert.ok(!(await page.evaluate(() => window.seen)).some((s) => s.kind === "error"));
      assert.equal(await page.evaluate(() => window.es.readyState), 1);
      await page.close();
    }
  });
});
