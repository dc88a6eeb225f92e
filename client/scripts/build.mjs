// Builds dist/ from src/: the ES modules and their declarations (tsc) for `import`, one
// CommonJS bundle with the same declarations under dist/cjs/ (marked CommonJS by its own
// package.json, so TypeScript reads them as CommonJS too) for `require`, and the
// self-contained browser modules fjord-client.js and fjord-client.min.js (esbuild).
import { execFileSync } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const client = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(client, "dist");
const cjs = join(dist, "cjs");

// Installing this folder by path runs `prepare` here, with only what this folder holds.
const { build } = await import("esbuild").catch(() => {
  console.error(`the build needs the dev dependencies: run \`npm ci\` in ${client} first`);
  process.exit(1);
});

rmSync(dist, { recursive: true, force: true });
const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
execFileSync(process.execPath, [tsc, "-p", join(client, "tsconfig.build.json")], { stdio: "inherit" });

const common = { entryPoints: [join(client, "src", "index.ts")], bundle: true, target: "es2020", logLevel: "warning" };
await Promise.all([
  build({ ...common, format: "esm", outfile: join(dist, "fjord-client.js") }),
  build({ ...common, format: "esm", minify: true, outfile: join(dist, "fjord-client.min.js") }),
  build({ ...common, format: "cjs", outfile: join(cjs, "index.js") }),
]);

mkdirSync(cjs, { recursive: true });
for (const file of readdirSync(dist)) {
  // Without the source map link: the maps' relative paths hold only beside the originals.
  if (file.endsWith(".d.ts")) {
    writeFileSync(join(cjs, file), readFileSync(join(dist, file), "utf8").replace(/\/\/# sourceMappingURL=.*\n?$/, ""));
  }
}
writeFileSync(join(cjs, "package.json"), '{ "type": "commonjs" }\n');
