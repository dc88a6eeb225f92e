// The demo page of `fjord dev` in headless Chromium: it loads the embedded @fjord/client from
// /fjord-client.js and shows orders appearing and drivers moving. Needs no Kafka or Redis
// (fjord dev runs its own). Set FJORD_E2E_SCREENSHOTS=DIR to keep a screenshot.

import assert from "node:assert/strict";
import { readFile, rm } from "node:fs/promises";
import { createServer } from "node:http";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { bin, freePort, launchBrowser, openPage, Proc, repoDir, tempDir, until } from "./harness.mjs";

const TIMEOUT = 60_000;
let dir, dev, port, browser;

before(async () => {
  dir = await tempDir("fjord-e2e-dev-");
  port = await freePort();
  dev = new Proc("fjord-dev", bin("fjord"), ["dev", "--port", String(port)], dir);
  await until(
    "fjord dev to serve",
    async () => {
      if (!dev.running) throw new Error(`fjord dev exited:\n${dev.tail()}`);
      return (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200;
    },
    TIMEOUT,
  );
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await dev?.stop();
  if (dir && !process.env.FJORD_E2E_KEEP) await rm(dir, { recursive: true, force: true });
});

test("fjord dev serves the client it embeds", async () => {
  const res = await fetch(`http://127.0.0.1:${port}/fjord-client.js`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /^text\/javascript/);
  assert.match(await res.text(), /export\s*\{[^}]*\bconnect\b/);
});

test("the demo page shows orders appearing and drivers moving, with the stream's status", { timeout: 2 * TIMEOUT }, async () => {
  const page = await openPage(browser, `http://127.0.0.1:${port}/`);
  try {
    await page.locator('#conn[data-state="live"]').waitFor({ timeout: TIMEOUT });
    await page.waitForFunction(() => document.querySelectorAll("#orders .order").length >= 3, null, { timeout: TIMEOUT });
    await page.waitForFunction(() => document.querySelectorAll("#drivers-layer .drv").length >= 2, null, { timeout: TIMEOUT });
    // A driver moves: its position on the map changes.
    const before = await page.$$eval("#drivers-layer .drv", (gs) => gs.map((g) => g.style.transform));
    await page.waitForFunction(
      (old) => [...document.querySelectorAll("#drivers-layer .drv")].some((g, i) => old[i] !== undefined && g.style.transform !== old[i]),
      before,
      { timeout: TIMEOUT },
    );
    await page.waitForFunction(() => Number(document.getElementById("st-rate").textContent) > 0, null, { timeout: TIMEOUT });
  } catch (error) {
    throw new Error(`${error.message}\nconsole:\n${page.consoleLines.join("\n")}\nfjord dev:\n${dev.tail(20)}`);
  }
  assert.equal(await page.locator("#conn-text").textContent(), "Live");
  const lastId = await page.locator("#st-id").textContent();
  assert.match(lastId, /^\d+-\d+(_\d+-\d+)?$/, `last event id ${lastId}`);
  assert.equal(await page.evaluate(() => window.fjordDemo.lastEventId !== undefined), true);
  assert.match(await page.locator("#orders .order .title").first().textContent(), /\S/);
  assert.deepEqual(page.consoleLines.filter((l) => l.startsWith("pageerror")), []);
  if (process.env.FJORD_E2E_SCREENSHOTS) {
    await page.screenshot({ path: join(process.env.FJORD_E2E_SCREENSHOTS, "demo.png"), fullPage: true });
  }
  await page.close();
});

test("the README's page snippet, served from another origin, shows live orders", { timeout: TIMEOUT }, async () => {
  const readme = await readFile(join(repoDir, "README.md"), "utf8");
  const section = readme.slice(readme.indexOf("## Browser and mobile clients"));
  const snippet = /```html\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(snippet, "an html snippet in the README's client section");
  const html = snippet.replaceAll("http://localhost:8080", `http://127.0.0.1:${port}`);
  const statics = createServer((_, res) => res.writeHead(200, { "content-type": "text/html" }).end(html));
  await new Promise((done) => statics.listen(0, "127.0.0.1", done));
  try {
    const page = await openPage(browser, `http://127.0.0.1:${statics.address().port}/`);
    try {
      await page.waitForFunction(() => document.querySelectorAll("#orders li").length >= 3, null, { timeout: TIMEOUT / 2 });
    } catch (error) {
      throw new Error(`${error.message}\nstatus: ${await page.locator("#status").textContent()}\nconsole:\n${page.consoleLines.join("\n")}`);
    }
    assert.equal(await page.locator("#status").textContent(), "open");
    assert.match(await page.locator("#orders li").first().textContent(), /^order-\S+: \{.*"status"/);
    await page.close();
  } finally {
    statics.closeAllConnections();
    await new Promise((done) => statics.close(done));
  }
});
