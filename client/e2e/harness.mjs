// The end-to-end harness: real fjord-server and fjord-consumer binaries against the Kafka and
// Redis of ci/services.sh, a static server for the test page (another origin than the Fjord
// server, so CORS is exercised) that also mints tokens with `fjord token`, a Kafka producer
// (kafkajs), a reader of a table endpoint's snapshot as a plain SSE client sees it, and
// headless Debian Chromium driven by playwright-core.

import { execFile, spawn } from "node:child_process";
import { createWriteStream, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { createServer } from "node:http";
import { createServer as createNetServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
export const clientDir = resolve(here, "..");
export const repoDir = resolve(clientDir, "..");
const binDir = process.env.FJORD_BIN_DIR ?? join(repoDir, "target", "debug");
export const bin = (name) => join(binDir, name);
const run = promisify(execFile);

export const CHROMIUM = process.env.FJORD_CHROMIUM ?? "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** The services of ci/services.sh, from the environment its env file sets. */
export function services() {
  const brokers = process.env.FJORD_TEST_KAFKA_BROKERS;
  const redis = process.env.FJORD_TEST_REDIS_URL;
  if (!brokers || !redis) {
    throw new Error("FJORD_TEST_KAFKA_BROKERS and FJORD_TEST_REDIS_URL are unset: run ci/services.sh up and source its env file");
  }
  return { brokers, redis };
}

export function unique(prefix) {
  return `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

export async function freePort() {
  return await new Promise((done, fail) => {
    const server = createNetServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

/** Polls `check` until it returns a truthy value, or throws after `timeoutMs`. */
export async function until(what, check, timeoutMs = 30_000, everyMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last}` : ""}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A child process whose output goes to a log file; `tail()` for failure messages. */
export class Proc {
  constructor(name, command, args, logDir, env = {}) {
    this.name = name;
    this.logPath = join(logDir, `${name}.log`);
    const log = createWriteStream(this.logPath, { flags: "a" });
    this.child = spawn(command, args, {
      env: { ...process.env, RUST_LOG: "info,fjord=debug", ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child.stdout.pipe(log, { end: false });
    this.child.stderr.pipe(log, { end: false });
    this.exited = new Promise((done) => this.child.once("exit", (code, signal) => done({ code, signal })));
  }

  get running() {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Sends `signal` and waits for the exit (SIGKILL after `graceMs`). */
  async stop(signal = "SIGTERM", graceMs = 25_000) {
    if (!this.running) return await this.exited;
    this.child.kill(signal);
    const timer = setTimeout(() => this.running && this.child.kill("SIGKILL"), graceMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  tail(lines = 40) {
    try {
      return readFileSync(this.logPath, "utf8").split("\n").slice(-lines).join("\n");
    } catch {
      return "";
    }
  }
}

/** `fjord setup` in a fresh directory: the key pair that the server trusts and `fjord token` signs with. */
export async function setupKeys(dir) {
  await run(bin("fjord"), ["setup", "--dir", dir]);
  return { dir, privateKey: join(dir, "fjord-private.pem"), publicKey: join(dir, "fjord-public.pem") };
}

/** Mints a JWT with `fjord token`. */
export async function mintToken(keys, { endpoints, ttl = 3600, audience, keys: recordKeys = [] }) {
  const args = ["token", "--private-key", keys.privateKey, "--ttl", String(ttl)];
  for (const endpoint of endpoints) args.push("--endpoint", endpoint);
  for (const key of recordKeys) args.push("--key", key);
  if (audience) args.push("--audience", audience);
  const { stdout } = await run(bin("fjord"), args);
  return stdout.trim();
}

/**
 * The page's origin: serves e2e/*.html, the built client at /fjord-client.js, and
 * GET /token?endpoint=E&ttl=S[&audience=A], which mints a token (and is counted).
 */
export async function startStaticServer(keys) {
  const tokenRequests = [];
  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? "/", "http://localhost");
    try {
      if (url.pathname === "/token") {
        const endpoints = url.searchParams.getAll("endpoint");
        const ttl = Number(url.searchParams.get("ttl") ?? "3600");
        const audience = url.searchParams.get("audience") ?? undefined;
        tokenRequests.push({ at: Date.now(), endpoints, ttl, reason: url.searchParams.get("reason") });
        const token = await mintToken(keys, { endpoints, ttl, audience });
        res.writeHead(200, { "content-type": "text/plain", "cache-control": "no-store" });
        res.end(token);
        return;
      }
      const files = {
        "/fjord-client.js": [join(clientDir, "dist", "fjord-client.js"), "text/javascript"],
        "/page.html": [join(here, "page.html"), "text/html; charset=utf-8"],
        "/table.html": [join(here, "table.html"), "text/html; charset=utf-8"],
      };
      const file = files[url.pathname];
      if (!file) {
        res.writeHead(404).end("not found");
        return;
      }
      res.writeHead(200, { "content-type": file[1], "cache-control": "no-store" });
      res.end(await readFile(file[0]));
    } catch (error) {
      res.writeHead(500, { "content-type": "text/plain" }).end(String(error));
    }
  });
  await new Promise((done) => server.listen(0, "127.0.0.1", done));
  const origin = `http://127.0.0.1:${server.address().port}`;
  return { origin, tokenRequests, close: () => new Promise((done) => (server.close(done), server.closeAllConnections())) };
}

/**
 * Writes a manifest for `endpoints` (name → topic, a stream endpoint that starts at the
 * oldest record; or name → `{ topic, mode: "table" }`), with JWT auth by the setup keys.
 */
export function writeManifest(dir, { brokers, redis, endpoints, port, origin, group }) {
  const spec = (topic) => (typeof topic === "string" ? { topics: [topic], start: "oldest" } : { topics: [topic.topic], mode: topic.mode });
  const manifest = {
    kafka: { brokers: [brokers] },
    redis: { url: redis, key_prefix: unique("e2e") },
    endpoints: Object.fromEntries(Object.entries(endpoints).map(([name, topic]) => [name, spec(topic)])),
    consumer_groups: [
      { id: group, topics: Object.values(endpoints).map((t) => (typeof t === "string" ? t : t.topic)), offset_reset: "earliest" },
    ],
    server: { host: "127.0.0.1", port, heartbeat_secs: 2, retry_ms: 300, cors_origins: [origin] },
    auth: {
      mode: "jwt",
      algorithms: ["EdDSA"],
      keys: [{ kid: "fjord-setup", pem_file: join(dir, "fjord-public.pem") }],
      issuer: "fjord-setup",
      audience: "fjord",
      leeway_secs: 0,
    },
  };
  const path = join(dir, "manifest.json");
  writeFileSync(path, JSON.stringify(manifest, null, 2));
  return path;
}

/** Starts fjord-server and waits until /readyz answers 200. */
export async function startServer(manifest, port, logDir) {
  const proc = new Proc("fjord-server", bin("fjord-server"), ["--manifest", manifest], logDir);
  try {
    await until(
      "fjord-server /readyz",
      async () => {
        if (!proc.running) throw new Error(`fjord-server exited:\n${proc.tail()}`);
        return (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200;
      },
      30_000,
    );
  } catch (error) {
    await proc.stop("SIGKILL");
    throw new Error(`${error.message}\n${proc.tail()}`);
  }
  return proc;
}

/** A kafkajs admin and producer on the CI broker. */
export async function kafka(brokers) {
  process.env.KAFKAJS_NO_PARTITIONER_WARNING = "1";
  const { Kafka, logLevel, Partitioners } = await import("kafkajs");
  const client = new Kafka({ clientId: "fjord-e2e", brokers: [brokers], logLevel: logLevel.ERROR,
    // Ride out a broker restart (other suites restart the shared broker).
    retry: { retries: 12, initialRetryTime: 300, maxRetryTime: 5000 } });
  const admin = client.admin();
  await admin.connect();
  const producer = client.producer({ createPartitioner: Partitioners.DefaultPartitioner, idempotent: false });
  await producer.connect();
  return {
    async createTopics(topics, partitions) {
      await admin.createTopics({
        waitForLeaders: true,
        topics: topics.map((topic) => ({ topic, numPartitions: partitions, replicationFactor: 1 })),
      });
    },
    /**
     * Produces records keyed `k<seq % keys>` whose value is `value(seq)` (`{ seq }` by default),
     * one send per record, so order per key holds.
     */
    async produce(topic, from, to, { keys = 3, everyMs = 0, value = (seq) => ({ seq }) } = {}) {
      for (let seq = from; seq < to; seq++) {
        await producer.send({
          topic,
          acks: -1,
          messages: [{ key: `k${seq % keys}`, value: JSON.stringify(value(seq)), headers: { source: "e2e" } }],
        });
        if (everyMs > 0) await new Promise((r) => setTimeout(r, everyMs));
      }
    },
    /** Sends records as they are: `{ key, value }` each, `value: null` a tombstone, `key: null` none. */
    async send(topic, records) {
      for (const { key, value } of records) {
        await producer.send({
          topic,
          acks: -1,
          messages: [{ key, value: value === null ? null : JSON.stringify(value) }],
        });
      }
    },
    async close() {
      await producer.disconnect().catch(() => undefined);
      await admin.disconnect().catch(() => undefined);
    },
  };
}

/**
 * Reads a table endpoint's snapshot as a plain SSE client would (curl, say): the stream at
 * `url` up to `fjord.snapshot_end` of `endpoint`. Returns the rows (each with whether it had
 * an `id:` line), the end's id, and the id of the prelude.
 */
export async function readSnapshot(url, { endpoint, headers = {}, timeoutMs = 15_000 }) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(new Error(`no fjord.snapshot_end of ${endpoint} from ${url} within ${timeoutMs} ms`)), timeoutMs);
  try {
    const res = await fetch(url, { headers: { accept: "text/event-stream", ...headers }, signal: abort.signal });
    if (!res.ok) throw new Error(`${url}: ${res.status} ${await res.text()}`);
    const decoder = new TextDecoder();
    let text = "";
    let prelude, open = false;
    const rows = [];
    for await (const chunk of res.body) {
      text += decoder.decode(chunk, { stream: true });
      let end;
      while ((end = text.indexOf("\n\n")) >= 0) {
        const block = text.slice(0, end);
        text = text.slice(end + 2);
        const fields = { id: undefined, event: "message", data: [] };
        for (const line of block.split("\n")) {
          const colon = line.indexOf(":");
          if (colon === 0) continue;
          const [name, value] = colon < 0 ? [line, ""] : [line.slice(0, colon), line.slice(colon + 1).replace(/^ /, "")];
          if (name === "data") fields.data.push(value);
          else if (name === "id" || name === "event") fields[name] = value;
        }
        const data = fields.data.join("\n");
        if (fields.data.length === 0) {
          if (fields.id !== undefined && prelude === undefined) prelude = fields.id;
        } else if (fields.event === "fjord.snapshot_start" && JSON.parse(data).endpoint === endpoint) {
          open = true;
        } else if (fields.event === "fjord.snapshot_end" && JSON.parse(data).endpoint === endpoint) {
          return { rows, id: fields.id, prelude };
        } else if (open && fields.event === endpoint) {
          rows.push({ ...JSON.parse(data), hasId: fields.id !== undefined });
        }
      }
    }
    throw new Error(`${url} ended before fjord.snapshot_end of ${endpoint}`);
  } finally {
    clearTimeout(timer);
    abort.abort();
  }
}

/** Headless Debian Chromium with a fresh profile. */
export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install chromium`);
  const { chromium } = await import("playwright-core");
  const profile = await mkdtemp(join(tmpdir(), "fjord-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1400, height: 1000 },
  });
  return {
    context,
    async close() {
      await context.close().catch(() => undefined);
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/** Opens a page and collects its console output and page errors for failure messages. */
export async function openPage(browser, url) {
  const page = await browser.context.newPage();
  const console = [];
  page.on("console", (m) => console.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => console.push(`pageerror: ${e.message}`));
  page.consoleLines = console;
  await page.goto(url);
  return page;
}

export async function tempDir(prefix) {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  mkdirSync(dir, { recursive: true });
  return dir;
}
