{
  description = "Fjord: Kafka topics to browsers and phones over Server-Sent Events";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    crane.url = "github:ipetkov/crane";
    rust-overlay = {
      url = "github:oxalica/rust-overlay";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  # nix build .#images               result/fjord-server.tar.gz, result/fjord-consumer.tar.gz
  # nix run .#deploy -- manifest.json  pushes those images and deploys them (see the README)
  # nix flake check                  clippy, unit tests, rustfmt, and every package
  # nix develop                      toolchain plus the services the tests start
  outputs =
    {
      self,
      nixpkgs,
      crane,
      rust-overlay,
      ...
    }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      eachSystem =
        f:
        nixpkgs.lib.genAttrs systems (
          system:
          f (
            import ./nix/packages.nix {
              pkgs = nixpkgs.legacyPackages.${system}.extend rust-overlay.overlays.default;
              inherit crane;
              revision = self.rev or "dirty";
            }
          )
        );
    in
    {
      packages = eachSystem (fjord: {
        inherit (fjord)
          fjord-server
          fjord-consumer
          fjord-deploy
          fjord-healthcheck
          images
          ;
        default = fjord.fjord-deploy;
      });

      apps = eachSystem (fjord: {
        deploy = {
          type = "app";
          program = "${fjord.deploy-with-images}/bin/fjord-deploy";
        };
      });

      checks = eachSystem (fjord: fjord.checks);

      devShells = eachSystem (fjord: {
        default = fjord.devShell;
      });
    };
}
