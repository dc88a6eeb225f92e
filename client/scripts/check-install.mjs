// Installs this package into two throwaway apps as its users would before it is published,
// from its folder (`npm install /path/to/client`) and from a git repository
// (`npm install git+file://…`, a fresh clone without dist/), and checks that `prepare` built
// it: both `require` and `import` of "@fjord/client" give `connect`. ci/test-client.sh runs it
// after `npm ci` (a folder install uses this folder's dev dependencies).
import { execFileSync } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const client = join(dirname(fileURLToPath(import.meta.url)), "..");
const work = mkdtempSync(join(tmpdir(), "fjord-client-install-"));
const npm = (cwd, ...args) =>
  execFileSync("npm", [...args, "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"], { cwd, stdio: ["ignore", "pipe", "inherit"] });
const git = (cwd, ...args) =>
  execFileSync("git", ["-c", "user.name=fjord-ci", "-c", "user.email=ci@fjord.invalid", ...args], { cwd, stdio: ["ignore", "pipe", "inherit"] });

function app(name, spec) {
  const dir = join(work, name);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "package.json"), JSON.stringify({ name, version: "1.0.0", private: true }));
  npm(dir, "install", spec);
  const cjs = execFileSync(process.execPath, ["-e", 'process.stdout.write(typeof require("@fjord/client").connect)'], { cwd: dir });
  const esm = execFileSync(process.execPath, ["--input-type=module", "-e", 'import { connect } from "@fjord/client"; process.stdout.write(typeof connect)'], { cwd: dir });
  if (`${cjs} ${esm}` !== "function function") throw new Error(`${name}: require gave ${cjs}, import gave ${esm}`);
  console.log(`${name}: npm install ${spec} built it; require and import both give connect`);
}

try {
  // Without dist/, so that only `prepare` can have built it.
  rmSync(join(client, "dist"), { recursive: true, force: true });
  app("from-folder", client);
  // A repository of the client's sources: no dist/, no node_modules/.
  const repo = join(work, "repo");
  cpSync(client, repo, { recursive: true, filter: (path) => !/[/\\](node_modules|dist)$/.test(path) });
  git(repo, "init", "-q");
  git(repo, "add", "-A");
  git(repo, "commit", "-qm", "client");
  app("from-git", `git+file://${repo}`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
