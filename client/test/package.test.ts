// The built package as its users get it: `require` and `import` by the package name both load
// a working client from Node (each streams a record from a node:http server and stops with an
// AbortSignal), and the browser bundle stays under its size budget. `npm test` builds dist/
// first; test/package/types.{cts,mts} check the declarations of both through `exports`.

import { execFile } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { afterAll, beforeAll, expect, it } from "vitest";
import { recordEvent } from "./scripted.js";

const client = join(dirname(fileURLToPath(import.meta.url)), "..");
/** Minified and gzipped, in bytes. */
const BUDGET = 5000;

const server = createServer((_req, res) => {
  res.writeHead(200, { "content-type": "text/event-stream" });
  res.write(recordEvent("orders", "7-0", { value: { n: 7 } }));
});
let base = "";

beforeAll(async () => {
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  server.closeAllConnections();
  server.close();
  await once(server, "close");
});

it.each(["cjs", "mjs"])("node loads the package by name from stream.%s and streams with it", async (ext) => {
  const { stdout } = await promisify(execFile)(process.execPath, [join(client, "test", "package", `stream.${ext}`), base], {
    cwd: client,
    timeout: 20_000,
  });
  expect(JSON.parse(stdout)).toEqual({
    format: ext === "cjs" ? "cjs" : "esm",
    fjordError: "function",
    records: [["orders", "7-0", { n: 7 }]],
    statuses: ["connecting:start", "open:opened", "closed:closed"],
  });
});

it(`the browser bundle is under ${BUDGET} bytes minified and gzipped`, () => {
  const size = gzipSync(readFileSync(join(client, "dist", "fjord-client.min.js")), { level: 9 }).length;
  console.log(`dist/fjord-client.min.js: ${size} bytes min+gz (budget ${BUDGET})`);
  expect(size).toBeLessThan(BUDGET);
});
