# The stand-in nixpkgs of nix/eval-stub.nix: a set per system with the attributes of
# nix/nixpkgs-attributes.nix and no other (each a stand-in derivation that remembers its
# arguments; the builders and lib functions the flake calls, as functions), and the names
# nixpkgs has replaced as the `throw`s nixpkgs has for them. A name the flake uses that
# the checked list lacks fails the evaluation, as it fails with the real nixpkgs.
let
  checked = import ./nixpkgs-attributes.nix;

  # A stand-in derivation for one system; its path differs by name, system and script.
  drv = system: name: args: {
    type = "derivation";
    inherit name args system;
    outPath = "/nix/store/${
      builtins.substring 0 32 (builtins.hashString "sha256" "${system} ${name} ${args.script or ""}")
    }-${name}";
  };
  genAttrs =
    names: f:
    builtins.listToAttrs (
      map (name: {
        inherit name;
        value = f name;
      }) names
    );

  lib = {
    inherit genAttrs;
    optionals = cond: list: if cond then list else [ ];
    optionalAttrs = cond: attrs: if cond then attrs else { };
    fileset = {
      unions = files: files;
      # Every file in the source set must exist.
      toSource =
        { root, fileset }:
        if builtins.all builtins.pathExists fileset then
          root
        else
          throw "eval-stub: a path in the crane source fileset does not exist";
    };
  };

  linuxSystems = [
    "x86_64-linux"
    "aarch64-linux"
  ];
  darwinSystems = [
    "aarch64-darwin"
    "x86_64-darwin"
  ];
  pkgsFor =
    system:
    let
      drv' = drv system;
      pythonPackages = builtins.mapAttrs (name: _: drv' name { }) checked.python3Packages;
      # What the flake calls as functions or reads as sets, not as packages.
      special = {
        inherit lib;
        stdenv.hostPlatform = {
          inherit system;
          isDarwin = builtins.elem system darwinSystems;
        };
        python3 = drv' "python3" { } // {
          withPackages = f: drv' "python3-env" { packages = f pythonPackages; };
        };
        dockerTools.buildLayeredImage = args: drv' "${args.name}.tar.gz" args;
        runCommand =
          name: env: script:
          drv' name { inherit env script; };
        linkFarm = name: entries: drv' name { inherit entries; };
      };
      unchecked = builtins.filter (name: !(checked.pkgs ? ${name})) (builtins.attrNames special);
      plain = builtins.removeAttrs checked.pkgs (builtins.attrNames special);
      basePkgs =
        if unchecked != [ ] then
          throw "eval-stub: ${toString unchecked} not in nix/nixpkgs-attributes.nix"
        else
          builtins.mapAttrs (name: _: drv' name { }) plain
          // builtins.mapAttrs (
            old: new: throw "'${old}' has been renamed to/replaced by '${new}'"
          ) checked.renamed
          // special
          // {
            # legacyPackages' own method, not a package.
            extend =
              overlay:
              let
                final = basePkgs // overlay final basePkgs;
              in
              final;
          };
    in
    basePkgs;
in
{
  inherit
    drv
    genAttrs
    lib
    linuxSystems
    darwinSystems
    pkgsFor
    ;
}
