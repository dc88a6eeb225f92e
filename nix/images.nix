# Minimal OCI images as docker archives (`docker load` / `podman load`): the two runtime
# binaries that a deploy runs, and `fjord dev` to try Fjord without building it. Each holds
# the binary and its shared libraries, CA certificates, a non-root user, no shell.
# Timestamps are fixed, so the same revision always gives the same image digests, and the
# image is labelled with the source revision.
{
  pkgs,
  revision,
  fjord,
  fjord-server,
  fjord-consumer,
  fjord-healthcheck,
}:
let
  uid = "10001";
  # /etc/passwd and /etc/group with the one user the processes run as.
  users = pkgs.runCommand "fjord-users" { } ''
    mkdir -p $out/etc
    echo 'fjord:x:${uid}:${uid}:fjord:/var/empty:/sbin/nologin' > $out/etc/passwd
    echo 'fjord:x:${uid}:' > $out/etc/group
  '';

  image =
    {
      name,
      contents,
      binary ? name,
      command ? [ ],
      ports ? { },
      env ? [ "FJORD_LOG_FORMAT=json" ],
      extraCommands ? "",
    }:
    pkgs.dockerTools.buildLayeredImage {
      inherit name extraCommands;
      tag = builtins.substring 0 12 revision;
      contents = contents ++ [
        pkgs.cacert
        users
      ];
      created = "1970-01-01T00:00:01Z";
      config = {
        Entrypoint = [ "/bin/${binary}" ];
        User = "${uid}:${uid}";
        Env = [ "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt" ] ++ env;
        ExposedPorts = ports;
        Labels = {
          "org.opencontainers.image.revision" = revision;
          "org.opencontainers.image.title" = name;
          "org.opencontainers.image.source" = "https://github.com/fjord-rs/fjord";
          "org.opencontainers.image.licenses" = "Apache-2.0";
        };
      }
      // pkgs.lib.optionalAttrs (command != [ ]) { Cmd = command; };
    };

  server = image {
    name = "fjord-server";
    # The health probe the task definition's container health check runs.
    contents = [
      fjord-server
      fjord-healthcheck
    ];
    ports = {
      "8080/tcp" = { };
    };
  };
  consumer = image {
    name = "fjord-consumer";
    contents = [ fjord-consumer ];
  };
  # `docker run -p 8080:8080 fjord-dev:TAG`: the whole pipeline in one process, listening
  # on every interface of the container so that the published port reaches it. Other
  # subcommands replace the command (`docker run fjord-dev:TAG token ...`). Logs are for
  # people here, not JSON, and /tmp is writable for what dev mode keeps there.
  dev = image {
    name = "fjord-dev";
    contents = [ fjord ];
    binary = "fjord";
    command = [
      "dev"
      "--host"
      "0.0.0.0"
    ];
    ports = {
      "8080/tcp" = { };
    };
    env = [ ];
    extraCommands = "mkdir -m 1777 tmp";
  };
in
{
  inherit server consumer dev;
  all = pkgs.linkFarm "fjord-images" [
    {
      name = "fjord-server.tar.gz";
      path = server;
    }
    {
      name = "fjord-consumer.tar.gz";
      path = consumer;
    }
    {
      name = "fjord-dev.tar.gz";
      path = dev;
    }
  ];
}
