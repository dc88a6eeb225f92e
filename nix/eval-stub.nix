# Evaluates flake.nix's outputs with stand-in inputs, where the real ones cannot be
# fetched (no network): nixpkgs, crane and rust-overlay are replaced by attrsets whose
# functions return stand-in derivations that remember their arguments. Evaluating every
# output strictly catches typos, missing attributes and wrong argument shapes; the
# expectations below check the outputs' structure and what the images are made of.
#
#   nix-instantiate --eval --strict --json nix/eval-stub.nix
let
  flake = import ../flake.nix;
  system = "x86_64-linux";
  rev = "0123456789abcdef0123456789abcdef01234567";

  inherit (import ./stub-pkgs.nix)
    drv
    genAttrs
    lib
    linuxSystems
    darwinSystems
    pkgsFor
    ;
  basePkgs = pkgsFor system;

  mkCraneLib =
    pkgs: toolchain:
    let
      drv' = drv pkgs.stdenv.hostPlatform.system;
    in
    {
      overrideToolchain = f: mkCraneLib pkgs (f pkgs);
      buildDepsOnly = args: drv' "${args.pname}-deps" (args // { inherit toolchain; });
      buildPackage = args: drv' args.pname (args // { inherit toolchain; });
      cargoClippy = args: drv' "clippy" (args // { inherit toolchain; });
      cargoTest = args: drv' "tests" (args // { inherit toolchain; });
      cargoFmt = args: drv' "fmt" (args // { inherit toolchain; });
      devShell = args: drv' "devshell" (args // { inherit toolchain; });
    };

  craneStub.mkLib = pkgs: mkCraneLib pkgs null;
  rustOverlay = final: prev: {
    rust-bin.stable.latest.default = drv prev.stdenv.hostPlatform.system "rust-toolchain" { };
  };

  outputs = flake.outputs {
    self = {
      inherit rev;
    };
    nixpkgs = {
      inherit lib;
      legacyPackages = genAttrs (linuxSystems ++ darwinSystems) pkgsFor;
    };
    crane = craneStub;
    rust-overlay.overlays.default = rustOverlay;
  };

  names = builtins.attrNames;
  expect = ok: message: if ok then true else throw "eval-stub: ${message}";
  hasInfix = infix: s: builtins.match ".*${infix}.*" s != null;
  packages = outputs.packages.${system};
  program = outputs.apps.${system}.deploy.program;
  images = packages.images.args.entries;
  imageArgs = map (entry: entry.path.args) images;
  devImage = (builtins.head (builtins.filter (entry: entry.name == "fjord-dev.tar.gz") images)).path.args;
  wrapper = builtins.head (builtins.match "/nix/store/[a-z0-9]{32}-(.*)/bin/fjord-deploy" program);
  # The same packages the flake builds, to look inside the deploy app's wrappers.
  fjordFor =
    system:
    import ./packages.nix {
      pkgs = (pkgsFor system).extend rustOverlay;
      crane = craneStub;
      revision = rev;
    };
  wrapperFor = here: linux: (fjordFor here).deployWith (fjordFor linux).imageArchives;
  # apps.${here}.${app} runs ${here}'s deploy tool with the images built for ${linux}.
  deploysWith =
    here: app: linux:
    expect (
      outputs.apps.${here}.${app}.program == "${wrapperFor here linux}/bin/fjord-deploy"
    ) "apps.${here}.${app} does not deploy ${here}'s tool with ${linux}'s images";
  imageSystems =
    here: name: map (entry: entry.path.system) outputs.packages.${here}.${name}.args.entries;
  darwin = "aarch64-darwin";
  darwinDeploy = outputs.packages.${darwin}.fjord-deploy;
  expectations = [
    (expect (
      names packages == [
        "default"
        "fjord"
        "fjord-consumer"
        "fjord-deploy"
        "fjord-healthcheck"
        "fjord-server"
        "images"
        "images-arm64"
        "images-x86_64"
      ]
    ) "packages.${system} has ${toString (names packages)}")
    (expect (builtins.all (apps: names apps == [
      "deploy"
      "deploy-arm64"
      "deploy-x86_64"
      "fjord-deploy"
    ]) (builtins.attrValues outputs.apps)) "a system lacks apps.deploy, deploy-arm64, deploy-x86_64 or fjord-deploy")
    # The tool alone: no image in its wrapper, so bootstrap, destroy, status, diff and
    # policy build nothing for Linux (a Mac needs no Linux builder for them).
    (expect (builtins.all (
      here:
      outputs.apps.${here}.fjord-deploy.program == "${(fjordFor here).deployTool}/bin/fjord-deploy"
      && !(hasInfix "IMAGE" (fjordFor here).deployTool.args.script)
    ) (builtins.attrNames outputs.apps)) "apps.fjord-deploy is not the tool alone")
    (expect (outputs.apps.${system}.deploy.type == "app") "apps.deploy is not an app")
    (expect (wrapper == "fjord-deploy-with-images") "apps.deploy runs ${program}")
    (deploysWith system "deploy" "x86_64-linux")
    (deploysWith system "deploy-arm64" "aarch64-linux")
    # `deploy` is x86_64, the manifest's default architecture, on every machine.
    (deploysWith "aarch64-linux" "deploy" "x86_64-linux")
    (deploysWith "aarch64-linux" "deploy-arm64" "aarch64-linux")
    (deploysWith darwin "deploy" "x86_64-linux")
    (deploysWith darwin "deploy-arm64" "aarch64-linux")
    (deploysWith darwin "deploy-x86_64" "x86_64-linux")
    (deploysWith "x86_64-darwin" "deploy" "x86_64-linux")
    (deploysWith "x86_64-darwin" "deploy-arm64" "aarch64-linux")
    (expect (
      names outputs.checks.${system} == [
        "clippy"
        "fjord"
        "fjord-consumer"
        "fjord-deploy"
        "fjord-server"
        "fmt"
        "tests"
      ]
    ) "checks has ${toString (names outputs.checks.${system})}")
    (expect (names outputs.devShells.${system} == [ "default" ]) "devShells has no default")
    (expect (outputs.checks.${system}.fmt.args.cargoExtraArgs == "--all") "checks.fmt does not check every crate of the workspace")
    (expect (names outputs.packages == [
      "aarch64-darwin"
      "aarch64-linux"
      "x86_64-darwin"
      "x86_64-linux"
    ]) "systems")
    # On a Mac: the deploy tool built natively without librdkafka, the images for Linux.
    (expect (
      names outputs.packages.${darwin} == [
        "default"
        "fjord-deploy"
        "images"
        "images-arm64"
        "images-x86_64"
      ]
    ) "packages.${darwin} has ${toString (names outputs.packages.${darwin})}")
    (expect (names outputs.checks.${darwin} == [ "fjord-deploy" ]) "checks.${darwin} builds more than the deploy tool")
    (expect (darwinDeploy.system == darwin) "the deploy tool on ${darwin} is built for ${darwinDeploy.system}")
    (expect (
      darwinDeploy.args.cargoArtifacts.args.cargoExtraArgs == "--locked -p fjord-deploy"
    ) "the deploy tool on ${darwin} shares a dependency build that has librdkafka")
    (expect (builtins.elem (pkgsFor darwin).libiconv darwinDeploy.args.buildInputs) "no libiconv on ${darwin}")
    (expect (imageSystems darwin "images" == [
      "aarch64-linux"
      "aarch64-linux"
      "aarch64-linux"
    ]) "images on ${darwin} are not aarch64-linux's")
    (expect (imageSystems system "images-arm64" == [
      "aarch64-linux"
      "aarch64-linux"
      "aarch64-linux"
    ]) "images-arm64 is not built for aarch64-linux")
    # librdkafka, OpenSSL, zlib, zstd and libcurl come from vendored sources, built with
    # cmake and perl. ci/sandbox-build.sh's PATH and FJORD_SANDBOX_LIBS (empty) mirror these
    # lists: change both together.
    (expect (
      packages.fjord-consumer.args.nativeBuildInputs == [
        basePkgs.cmake
        basePkgs.perl
        basePkgs.pkg-config
      ]
      && packages.fjord-consumer.args.buildInputs == [ ]
    ) "the build inputs are not cmake, perl and pkg-config, and no library")
    # The server is `fjord-server`'s binary, which has no librdkafka among its
    # dependencies (ci/check-parts.sh), built on a dependency build of its own.
    (expect (
      packages.fjord-server.args.cargoExtraArgs == "--locked -p fjord-server"
      && packages.fjord-server.args.cargoArtifacts.args.cargoExtraArgs == "--locked -p fjord-server"
      && packages.fjord-consumer.args.cargoExtraArgs == "--locked -p fjord-consumer"
    ) "fjord-server is not built from its own crate, or the consumer not from fjord-consumer")
    (expect (
      map (entry: entry.name) images == [
        "fjord-server.tar.gz"
        "fjord-consumer.tar.gz"
        "fjord-dev.tar.gz"
      ]
    ) "images are not the server's, the consumer's and dev mode's archives")
    # `docker run -p 8080:8080 fjord-dev:TAG` runs `fjord dev` reachable from outside the
    # container: the CLI binary (with librdkafka), on every interface, /tmp writable.
    (expect (
      devImage.config.Entrypoint == [ "/bin/fjord" ]
      && devImage.config.Cmd == [
        "dev"
        "--host"
        "0.0.0.0"
      ]
      && devImage.config.ExposedPorts ? "8080/tcp"
      && devImage.extraCommands == "mkdir -m 1777 tmp"
      && builtins.elem packages.fjord devImage.contents
      && packages.fjord.args.cargoExtraArgs == "--locked -p fjord"
    ) "the dev image does not run `fjord dev --host 0.0.0.0` with the CLI binary")
    # The deploy's images keep their config: no command, JSON logs.
    (expect (builtins.all (
      image: !(image.config ? Cmd) && builtins.elem "FJORD_LOG_FORMAT=json" image.config.Env
    ) (builtins.filter (image: image.name != "fjord-dev") imageArgs)) "a deploy image changed its command or log format")
    (expect (builtins.all (image: image.config.User == "10001:10001") imageArgs) "an image runs as root")
    (expect (builtins.all (
      image: image.config.Labels."org.opencontainers.image.revision" == rev
    ) imageArgs) "an image is not labelled with the revision")
    (expect (builtins.all (image: image.created == "1970-01-01T00:00:01Z") imageArgs) "an image has a moving timestamp")
    (expect (builtins.all (
      image:
      builtins.all (
        content:
        !builtins.elem content.name [
          "bash"
          "busybox"
          "coreutils"
        ]
      ) image.contents
    ) imageArgs) "an image has a shell")
    (expect (builtins.all (image: builtins.elem basePkgs.cacert image.contents) imageArgs) "an image lacks CA certificates")
    (expect (hasInfix "--set-default FJORD_SERVER_IMAGE ${(builtins.head images).path}" (wrapperFor system system).args.script)
      "the deploy app does not find the server image"
    )
  ];
in
builtins.deepSeq outputs {
  ok = builtins.all (x: x) expectations;
  systems = names outputs.packages;
  packages = names packages;
  apps = names outputs.apps.${system};
  checks = names outputs.checks.${system};
  devShells = names outputs.devShells.${system};
}
