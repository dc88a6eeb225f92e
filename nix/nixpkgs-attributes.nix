# Every nixpkgs attribute the flake uses (flake.nix, nix/packages.nix, nix/images.nix),
# each checked against nixpkgs on the pinned branch (nixos-26.05, flake.lock) where it is
# defined; the value says where. nix/eval-stub.nix builds its stand-in nixpkgs from this
# list and nothing else, so a name that is not here fails the stub evaluation: add a name
# only after finding it in nixpkgs itself, and not in pkgs/top-level/aliases.nix.
{
  pkgs = {
    actionlint = "pkgs/by-name/ac/actionlint/package.nix";
    cacert = "pkgs/by-name/ca/cacert/package.nix";
    cmake = "pkgs/by-name/cm/cmake/package.nix";
    distribution = "pkgs/by-name/di/distribution/package.nix";
    dockerTools = "pkgs/top-level/all-packages.nix (pkgs/build-support/docker)";
    jdk17_headless = "pkgs/top-level/all-packages.nix (openjdk17_headless)";
    kcat = "pkgs/by-name/kc/kcat/package.nix";
    lib = "lib/";
    libiconv = "pkgs/top-level/all-packages.nix (libc's iconv, or libiconvReal on Darwin)";
    linkFarm = "pkgs/build-support/trivial-builders/default.nix";
    makeWrapper = "pkgs/top-level/all-packages.nix (makeShellWrapper)";
    maven = "pkgs/by-name/ma/maven/package.nix";
    perl = "pkgs/top-level/all-packages.nix (perl540)";
    pkg-config = "pkgs/top-level/all-packages.nix (pkgs/build-support/pkg-config-wrapper)";
    python3 = "pkgs/top-level/all-packages.nix";
    redis = "pkgs/by-name/re/redis/package.nix";
    runCommand = "pkgs/build-support/trivial-builders/default.nix";
    stdenv = "pkgs/stdenv/";
  };
  python3Packages = {
    flask = "pkgs/development/python-modules/flask/default.nix";
    flask-cors = "pkgs/development/python-modules/flask-cors/default.nix";
    moto = "pkgs/development/python-modules/moto/default.nix";
  };
  # Names nixpkgs has replaced (pkgs/top-level/aliases.nix makes each a `throw`): the stub
  # throws as nixpkgs does, so that using one fails here as it fails there.
  renamed = {
    docker-distribution = "distribution";
  };
}
