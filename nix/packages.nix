# The workspace built with crane: one dependency build shared by the packages and the
# checks, a second one without the `kafka` feature for the server (which must not link
# librdkafka), the images, the deploy tool wrapped to find them, and the dev shell.
{
  pkgs,
  crane,
  revision,
}:
let
  inherit (pkgs) lib;
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
    # librdkafka (the consumer's `kafka` feature) is built from source by rdkafka-sys.
    nativeBuildInputs = [
      pkgs.pkg-config
      pkgs.cmake
      pkgs.perl
      pkgs.python3
    ];
    buildInputs = [
      pkgs.openssl
      pkgs.zlib
    ];
  };

  cargoArtifacts = craneLib.buildDepsOnly common;
  serverArtifacts = craneLib.buildDepsOnly (
    common
    // {
      pname = "fjord-server";
      cargoExtraArgs = "--locked -p fjord --no-default-features";
    }
  );

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
    cargoExtraArgs = "--locked -p fjord --no-default-features --bin fjord-server";
  };
  fjord-consumer = binary {
    pname = "fjord-consumer";
    artifacts = cargoArtifacts;
    cargoExtraArgs = "--locked -p fjord --bin fjord-consumer";
  };
  fjord-deploy = binary {
    pname = "fjord-deploy";
    artifacts = cargoArtifacts;
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
      fjord-server
      fjord-consumer
      fjord-healthcheck
      ;
  };

  checks = {
    inherit fjord-server fjord-consumer fjord-deploy;
    clippy = craneLib.cargoClippy (
      common
      // {
        inherit cargoArtifacts;
        cargoClippyExtraArgs = "--workspace --all-targets -- --deny warnings";
      }
    );
    clippy-server = craneLib.cargoClippy (
      common
      // {
        cargoArtifacts = serverArtifacts;
        cargoExtraArgs = "--locked -p fjord --no-default-features";
        cargoClippyExtraArgs = "--lib --bin fjord-server -- --deny warnings";
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
    fmt = craneLib.cargoFmt { inherit src; };
  };
in
{
  inherit
    fjord-server
    fjord-consumer
    fjord-deploy
    fjord-healthcheck
    checks
    ;
  images = images.both;

  # `nix run .#deploy`: the deploy tool, pointed at the images of the same revision
  # unless FJORD_SERVER_IMAGE / FJORD_CONSUMER_IMAGE say otherwise.
  deploy-with-images =
    pkgs.runCommand "fjord-deploy-with-images" { nativeBuildInputs = [ pkgs.makeWrapper ]; }
      ''
        makeWrapper ${fjord-deploy}/bin/fjord-deploy $out/bin/fjord-deploy \
          --set-default FJORD_SERVER_IMAGE ${images.server} \
          --set-default FJORD_CONSUMER_IMAGE ${images.consumer} \
          --set-default SSL_CERT_FILE ${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt
      '';

  devShell = craneLib.devShell {
    inherit checks;
    packages = [
      pkgs.redis
      pkgs.jdk17_headless
      pkgs.maven
      pkgs.docker-distribution
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
