# The workspace built with crane: one dependency build shared by the consumer, the CLI and
# the checks, one of the server's own (`fjord-server`: no librdkafka, no CLI, so fewer
# crates and features than the workspace's), the images, the deploy tool wrapped to find
# them, and the dev shell. On a Mac only the deploy tool is built here; its images come from
# the Linux package set.
{
  pkgs,
  crane,
  revision,
}:
let
  inherit (pkgs) lib;
  inherit (pkgs.stdenv.hostPlatform) isDarwin;
  craneLib = (crane.mkLib pkgs).overrideToolchain (p: p.rust-bin.stable.latest.default);

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../.clippy.toml
      ../src
      ../tests
      ../deploy
    ];
  };

  common = {
    inherit src;
    pname = "fjord";
    version = "0.1.0";
    strictDeps = true;
    # librdkafka (fjord-consumer's and fjord's) is built by rdkafka-sys with CMake, with
    # OpenSSL (perl runs its Configure), zlib, zstd and libcurl from vendored sources: no
    # system library is linked. ci/sandbox-build.sh rehearses this build without /usr/bin/env,
    # with the headers of the Debian packages that stand for these buildInputs, and these
    # tools: pkg-config is kept so that librdkafka's CMake probes run as rehearsed there.
    nativeBuildInputs = [
      pkgs.cmake
      pkgs.perl
      pkgs.pkg-config
    ];
    # No library: libcurl, whose header librdkafka 2.12 always includes, is built from
    # curl-sys's sources too (rdkafka's `curl-static`). Rust programs link libiconv on Darwin.
    buildInputs = lib.optionals isDarwin [ pkgs.libiconv ];
  };

  # `--workspace`: the top's default members leave the deploy tool out.
  cargoArtifacts = craneLib.buildDepsOnly (common // { cargoExtraArgs = "--locked --workspace"; });
  # The server's dependencies only: its tests, and the integration tests (fjord-tests, whose
  # dev-dependencies include librdkafka, to produce records), run in the checks, on the
  # workspace's build.
  serverArtifacts = craneLib.buildDepsOnly (
    common
    // {
      pname = "fjord-server";
      cargoExtraArgs = "--locked -p fjord-server";
      cargoCheckExtraArgs = "";
      doCheck = false;
    }
  );

  # fjord-deploy needs only the manifest's types (`fjord-config`). On Linux it shares the
  # workspace's dependency build; on a Mac, where nothing else is built, its own build
  # keeps librdkafka and OpenSSL out.
  deployArtifacts =
    if isDarwin then
      craneLib.buildDepsOnly (
        common
        // {
          pname = "fjord-deploy";
          cargoExtraArgs = "--locked -p fjord-deploy";
        }
      )
    else
      cargoArtifacts;

  binary =
    {
      pname,
      artifacts,
      cargoExtraArgs,
    }:
    craneLib.buildPackage (
      common
      // {
        inherit pname cargoExtraArgs;
        cargoArtifacts = artifacts;
        # The checks run the tests once, for the whole workspace.
        doCheck = false;
      }
    );

  fjord-server = binary {
    pname = "fjord-server";
    artifacts = serverArtifacts;
    cargoExtraArgs = "--locked -p fjord-server";
  };
  fjord-consumer = binary {
    pname = "fjord-consumer";
    artifacts = cargoArtifacts;
    cargoExtraArgs = "--locked -p fjord-consumer";
  };
  # The developer CLI (`fjord dev`, `setup`, `token`, `check`, `bench`), for the dev image.
  fjord = binary {
    pname = "fjord";
    artifacts = cargoArtifacts;
    cargoExtraArgs = "--locked -p fjord";
  };
  fjord-deploy = binary {
    pname = "fjord-deploy";
    artifacts = deployArtifacts;
    cargoExtraArgs = "--locked -p fjord-deploy";
  };
  fjord-healthcheck = binary {
    pname = "fjord-healthcheck";
    artifacts = serverArtifacts;
    cargoExtraArgs = "--locked -p fjord-healthcheck";
  };

  images = import ./images.nix {
    inherit
      pkgs
      revision
      fjord
      fjord-server
      fjord-consumer
      fjord-healthcheck
      ;
  };

  linuxChecks = {
    inherit
      fjord
      fjord-server
      fjord-consumer
      fjord-deploy
      ;
    clippy = craneLib.cargoClippy (
      common
      // {
        inherit cargoArtifacts;
        cargoClippyExtraArgs = "--workspace --all-targets -- --deny warnings";
      }
    );
    # Unit tests; the integration tests need Kafka, Redis, moto and a registry, which
    # ci/test.sh and ci/test-deploy.sh start outside the sandbox.
    tests = craneLib.cargoTest (
      common
      // {
        inherit cargoArtifacts;
        cargoTestExtraArgs = "--workspace --lib --bins";
      }
    );
    # `--all`: without it cargo fmt checks the root package only, not the workspace.
    fmt = craneLib.cargoFmt {
      inherit src;
      cargoExtraArgs = "--all";
    };
  };
  # On a Mac, `nix flake check` builds what runs there; the rest is checked on Linux.
  checks = if isDarwin then { inherit fjord-deploy; } else linuxChecks;
in
{
  inherit
    fjord
    fjord-server
    fjord-consumer
    fjord-deploy
    fjord-healthcheck
    checks
    ;
  images = images.all;
  # The two archives, for deployWith.
  imageArchives = {
    inherit (images) server consumer;
  };

  # `nix run .#fjord-deploy`: this system's deploy tool with the CA certificates and no
  # images, for what needs none (bootstrap, destroy, status, diff, rollback, verify,
  # policy): nothing is built for Linux.
  deployTool = pkgs.runCommand "fjord-deploy-tool" { nativeBuildInputs = [ pkgs.makeWrapper ]; } ''
    makeWrapper ${fjord-deploy}/bin/fjord-deploy $out/bin/fjord-deploy \
      --set-default SSL_CERT_FILE ${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt
  '';

  # `nix run .#deploy`: this system's deploy tool, pointed at the given images (built for
  # Linux, maybe by another machine) unless FJORD_SERVER_IMAGE / FJORD_CONSUMER_IMAGE say
  # otherwise.
  deployWith =
    archives:
    pkgs.runCommand "fjord-deploy-with-images" { nativeBuildInputs = [ pkgs.makeWrapper ]; } ''
      makeWrapper ${fjord-deploy}/bin/fjord-deploy $out/bin/fjord-deploy \
        --set-default FJORD_SERVER_IMAGE ${archives.server} \
        --set-default FJORD_CONSUMER_IMAGE ${archives.consumer} \
        --set-default SSL_CERT_FILE ${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt
    '';

  devShell = craneLib.devShell {
    inherit checks;
    packages = [
      pkgs.redis
      pkgs.jdk17_headless
      pkgs.maven
      pkgs.distribution
      pkgs.actionlint
      pkgs.kcat
      (pkgs.python3.withPackages (ps: [
        ps.moto
        ps.flask
        ps.flask-cors
      ]))
    ];
  };
}
