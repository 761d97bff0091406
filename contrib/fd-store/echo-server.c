/*
 * echo-server.c: a line server whose connections survive reloads, through sockhold's fd
 * store (systemd's file descriptor store protocol, so it runs unchanged under systemd with
 * FileDescriptorStoreMax=).
 *
 * Build:  cc -O2 -o echo-server echo-server.c $(pkg-config --cflags --libs libsystemd)
 * Run:    sockhold -l 127.0.0.1:7000 --ready notify --fd-store 64 -- ./echo-server
 * Try:    nc 127.0.0.1 7000, type "ping 1", then `kill -HUP <sockhold>`, and "ping 2" on the
 *         same connection is answered by the next generation.
 *
 * How it works:
 * - At start, sd_listen_fds_with_names() gives the fds from 3: the listening sockets first,
 *   then the connections earlier generations stored (a listening socket tells itself apart
 *   with sd_is_socket(..., listening=1); a stored one is named as it was stored).
 * - Every connection is stored as soon as it is accepted, with
 *   sd_pid_notify_with_fds(0, 0, "FDSTORE=1\nFDNAME=conn-N", &fd, 1). sockhold starts the
 *   next generation before it stops this one, so a connection stored only at SIGTERM would
 *   miss it. sd_notify_barrier() then waits until sockhold has read the message.
 * - SIGTERM ends the process at once: sockhold still holds every stored connection, so no
 *   client sees a reset, and the next generation already has them.
 * - While two generations overlap both poll the same connection; each answer is written in
 *   one write() by whichever reads the line, so the client gets exactly one.
 *
 * Protocol, one line each way: on accept "hello conn-N from generation G"; "ping X" ->
 * "pong X from generation G"; "keep" -> the connection is stored again with FDPOLL=0
 * (FDSTOREREMOVE=1 and FDSTORE=1 in one message: the removal comes first) -> "kept conn-N";
 * "bye" -> FDSTOREREMOVE=1 closes sockhold's copy, this process closes its own -> "bye conn-N",
 * then the client reads EOF; "crash" -> exit 3 (sockhold restarts it; the stored connections
 * come back). Each event is logged as one JSON line on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#define MAX_FDS 256

struct conn {
	int fd;
	char name[64];
	char buf[4096];
	size_t len;
};

static struct conn conns[MAX_FDS];
static int nconns;
static int listeners[MAX_FDS];
static int nlisteners;
static int next_number = 1;
static const char *generation = "?";

static void log_event(const char *event, const char *name)
{
	/* One write per line: every generation shares the same stdout. */
	printf("{\"event\":\"%s\",\"generation\":\"%s\",\"pid\":%d,\"name\":\"%s\"}\n", event,
	       generation, (int)getpid(), name ? name : "");
	fflush(stdout);
}

static void store(int fd, const char *name, const char *extra)
{
	char message[256];
	snprintf(message, sizeof message, "%sFDSTORE=1\nFDNAME=%s", extra, name);
	int r = sd_pid_notify_with_fds(0, 0, message, &fd, 1);
	if (r <= 0)
		fprintf(stderr, "echo-server: storing %s failed: %s\n", name,
			r < 0 ? strerror(-r) : "no NOTIFY_SOCKET");
	/* Returns once the manager has read every message sent before. */
	r = sd_notify_barrier(0, 5 * 1000 * 1000);
	if (r < 0)
		fprintf(stderr, "echo-server: barrier failed: %s\n", strerror(-r));
}

static void add_conn(int fd, const char *name)
{
	if (nconns == MAX_FDS) {
		close(fd);
		return;
	}
	/* O_NONBLOCK is shared with the other generation holding it: whichever reads a line
	 * first answers it, the other gets EAGAIN instead of hanging. */
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	struct conn *c = &conns[nconns++];
	c->fd = fd;
	c->len = 0;
	snprintf(c->name, sizeof c->name, "%s", name);
	int n;
	if (sscanf(name, "conn-%d", &n) == 1 && n >= next_number)
		next_number = n + 1;
}

static void drop_conn(int i)
{
	close(conns[i].fd);
	conns[i] = conns[--nconns];
}

static void reply(struct conn *c, const char *text)
{
	char line[512];
	int n = snprintf(line, sizeof line, "%s\n", text);
	if (write(c->fd, line, (size_t)n) < 0)
		fprintf(stderr, "echo-server: write to %s: %s\n", c->name, strerror(errno));
}

/* Handles one line; returns 0 when the connection is done with. */
static int handle(struct conn *c, char *line)
{
	char text[512];
	if (strncmp(line, "ping ", 5) == 0) {
		snprintf(text, sizeof text, "pong %.200s from generation %s", line + 5, generation);
		reply(c, text);
	} else if (strcmp(line, "keep") == 0) {
		store(c->fd, c->name, "FDSTOREREMOVE=1\nFDPOLL=0\n");
		snprintf(text, sizeof text, "kept %s", c->name);
		reply(c, text);
	} else if (strcmp(line, "bye") == 0) {
		char message[128];
		snprintf(message, sizeof message, "FDSTOREREMOVE=1\nFDNAME=%s", c->name);
		sd_notify(0, message);
		sd_notify_barrier(0, 5 * 1000 * 1000);
		snprintf(text, sizeof text, "bye %s", c->name);
		reply(c, text);
		log_event("removed", c->name);
		return 0;
	} else if (strcmp(line, "crash") == 0) {
		log_event("crash", c->name);
		exit(3);
	} else {
		reply(c, "unknown command");
	}
	return 1;
}

/* Reads what a connection has; returns 0 when it is done with (EOF, error, "bye"). */
static int serve(struct conn *c)
{
	ssize_t n = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
	if (n < 0)
		return errno == EAGAIN || errno == EINTR;
	if (n == 0)
		return 0;
	c->len += (size_t)n;
	c->buf[c->len] = '\0';
	char *start = c->buf, *end;
	while ((end = strchr(start, '\n'))) {
		*end = '\0';
		if (end > start && end[-1] == '\r')
			end[-1] = '\0';
		if (!handle(c, start))
			return 0;
		start = end + 1;
	}
	c->len = strlen(start);
	memmove(c->buf, start, c->len);
	if (c->len == sizeof c->buf - 1)
		c->len = 0; /* a line too long: dropped */
	return 1;
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	const char *g = getenv("SOCKHOLD_GENERATION");
	if (g)
		generation = g;
	char **names = NULL;
	int n = sd_listen_fds_with_names(1, &names);
	if (n < 0) {
		fprintf(stderr, "echo-server: sd_listen_fds: %s\n", strerror(-n));
		return 1;
	}
	const char *fdstore = getenv("FDSTORE");
	printf("{\"event\":\"start\",\"generation\":\"%s\",\"pid\":%d,\"fdstore\":\"%s\","
	       "\"names\":[",
	       generation, (int)getpid(), fdstore ? fdstore : "");
	for (int i = 0; i < n; i++)
		printf("%s\"%s\"", i ? "," : "", names && names[i] ? names[i] : "");
	printf("]}\n");
	fflush(stdout);
	for (int i = 0; i < n; i++) {
		int fd = SD_LISTEN_FDS_START + i;
		if (sd_is_socket(fd, AF_UNSPEC, SOCK_STREAM, 1) > 0) {
			fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
			if (nlisteners < MAX_FDS)
				listeners[nlisteners++] = fd;
		} else {
			add_conn(fd, names && names[i] ? names[i] : "stored");
			/* Storing it again is harmless: the store keeps one copy of each fd. */
			store(fd, conns[nconns - 1].name, "");
			log_event("resumed", conns[nconns - 1].name);
		}
	}
	sd_notify(0, "READY=1");

	struct pollfd pfds[2 * MAX_FDS];
	for (;;) {
		int k = 0;
		for (int i = 0; i < nlisteners; i++)
			pfds[k++] = (struct pollfd){ .fd = listeners[i], .events = POLLIN };
		for (int i = 0; i < nconns; i++)
			pfds[k++] = (struct pollfd){ .fd = conns[i].fd, .events = POLLIN };
		if (poll(pfds, (nfds_t)k, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("echo-server: poll");
			return 1;
		}
		for (int i = 0; i < nlisteners; i++) {
			if (!pfds[i].revents)
				continue;
			int fd = accept4(listeners[i], NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
			if (fd < 0)
				continue; /* the other generation took it */
			char name[64], text[128];
			snprintf(name, sizeof name, "conn-%d", next_number++);
			store(fd, name, "");
			add_conn(fd, name);
			log_event("accepted", name);
			snprintf(text, sizeof text, "hello %s from generation %s", name, generation);
			reply(&conns[nconns - 1], text);
		}
		/* Backwards: drop_conn moves the last connection into the hole. The connections
		 * accepted in this turn are past k and wait for the next poll. */
		for (int i = k - nlisteners - 1; i >= 0; i--) {
			if (pfds[nlisteners + i].revents && !serve(&conns[i]))
				drop_conn(i);
		}
	}
}
