// Headless Chromium against the real fjord-server: a page on another origin streams with a
// plain EventSource and its token in a cookie (`withCredentials`), the cross-origin cookie
// mode of docs/operations.md ("Cross-origin pages"). The browser allows it only when the server names the origin and
// allows credentials; with `cors_origins: ["*"]` it refuses. Run by ci/test-browser.sh.

import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { rm } from "node:fs/promises";
import { after, before, test } from "node:test";

import {
  freePort,
  launchBrowser,
  openPage,
  services,
  setupKeys,
  startServer,
  startStaticServer,
  tempDir,
  unique,
  writeManifest,
} from "./harness.mjs";

const ENDPOINT = unique("e2e-cookie");
const COOKIE = "fjord_token";
const TIMEOUT = 60_000;

let dir, keys, statics, browser;
const servers = [];

before(async () => {
  dir = await tempDir("fjord-e2e-cookie-");
  keys = await setupKeys(dir);
  statics = await startStaticServer(keys);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  for (const server of servers) await server.stop();
  await statics?.close();
  if (dir && !process.env.FJORD_E2E_KEEP) await rm(dir, { recursive: true, force: true });
});

/** Starts a server that takes tokens from the cookie and allows `corsOrigins`; its port. */
async function serverWith(corsOrigins) {
  const { brokers, redis } = services();
  const port = await freePort();
  const path = writeManifest(dir, {
    brokers,
    redis,
    port,
    origin: statics.origin,
    group: unique("e2e-group"),
    endpoints: { [ENDPOINT]: `${ENDPOINT}-topic` },
  });
  const manifest = JSON.parse(readFileSync(path, "utf8"));
  manifest.server.cors_origins = corsOrigins;
  manifest.auth.token_cookie = COOKIE;
  writeFileSync(path, JSON.stringify(manifest, null, 2));
  servers.push(await startServer(path, port, dir));
  return port;
}

/**
 * Opens a page on the static origin (its /token answer, whose text is a fresh token), puts
 * the token in a cookie, and opens an EventSource with credentials to the server on `port`:
 * "open", or "error" when the browser or the server refused it.
 */
async function streamWithCookie(port, { cookie = true } = {}) {
  const page = await openPage(browser, `${statics.origin}/token?endpoint=${ENDPOINT}&ttl=600`);
  try {
    return await page.evaluate(
      ({ url, cookie, name }) => {
        document.cookie = cookie
          ? `${name}=${document.body.innerText.trim()}; path=/`
          : `${name}=; path=/; max-age=0`;
        return new Promise((done) => {
          const source = new EventSource(url, { withCredentials: true });
          source.onopen = () => (source.close(), done("open"));
          source.onerror = () => (source.close(), done("error"));
        });
      },
      { url: `http://127.0.0.1:${port}/v1/streams/${ENDPOINT}`, cookie, name: COOKIE },
    );
  } finally {
    await page.close();
  }
}

test("a listed origin streams with the token in a cookie", { timeout: TIMEOUT }, async () => {
  const port = await serverWith([statics.origin]);
  assert.equal(await streamWithCookie(port), "open", "the cookie was sent and the answer allowed credentials");
  assert.equal(await streamWithCookie(port, { cookie: false }), "error", "without the cookie there is no token");
});

test("with cors_origins [\"*\"] a browser refuses a stream with credentials", { timeout: TIMEOUT }, async () => {
  const port = await serverWith(["*"]);
  assert.equal(await streamWithCookie(port), "error");
});
