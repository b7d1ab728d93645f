-- The messenger database, schema version 4.
--
-- messenger.py runs this file in parts, each inside one transaction: on a
-- new database (user_version 0) everything up to "-- upgrades", then the
-- search index; on an older one, only its upgrade steps at the end, then
-- the search index. Every statement may run twice (two processes starting
-- on one new file), hence IF NOT EXISTS.

CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY,
    email         TEXT NOT NULL,
    email_key     TEXT NOT NULL UNIQUE,     -- the email, NFC-normalised and casefolded
    username      TEXT NOT NULL,
    username_key  TEXT NOT NULL UNIQUE,     -- the username, NFC-normalised and casefolded
    -- what a search compares: Russian is written with and without ё
    search_key    TEXT GENERATED ALWAYS AS (replace(username_key, 'ё', 'е')) VIRTUAL,
    name          TEXT NOT NULL DEFAULT '',
    -- the name's words as a search compares them (folded, ё read as е), by spaces
    name_key      TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL DEFAULT '',
    phone         TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,            -- pbkdf2_sha256$iterations$salt$hash
    created_at    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS users_by_search_key ON users (search_key, username_key);

-- A session is known by the SHA-256 of its token; the token itself is
-- only ever in the client's cookie.
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at REAL NOT NULL                -- Unix time
);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id);

CREATE TABLE IF NOT EXISTS login_failures (
    email_key TEXT NOT NULL,
    failed_at REAL NOT NULL                 -- Unix time
);
CREATE INDEX IF NOT EXISTS login_failures_by_email ON login_failures (email_key, failed_at);

CREATE TABLE IF NOT EXISTS photos (
    user_id      INTEGER PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    content_type TEXT NOT NULL,
    etag         TEXT NOT NULL,
    data         BLOB NOT NULL
);

-- A chat is a dialog of two users, stored once for the pair, or a named
-- group of up to 100 members. AUTOINCREMENT: the id of a deleted group is
-- never given to a new chat, which clients would take for the old one.
CREATE TABLE IF NOT EXISTS chats (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    type            TEXT NOT NULL CHECK (type IN ('dialog', 'group')),
    -- a dialog's two members, smaller id first; NULL in a group (NULLs never
    -- collide in a UNIQUE constraint, so only dialogs are one per pair)
    user_low        INTEGER REFERENCES users (id) ON DELETE CASCADE,
    user_high       INTEGER REFERENCES users (id) ON DELETE CASCADE,
    name            TEXT NOT NULL DEFAULT '',   -- a group's; a dialog shows the other member's
    owner_id        INTEGER REFERENCES users (id) ON DELETE SET NULL,  -- a group's
    created_at      TEXT NOT NULL,
    -- kept by messenger.py; no foreign key, which would make every deleted
    -- message search this table for chats pointing at it
    last_message_id INTEGER,
    -- The largest message id when the chat was opened, plus 0.5: sorting by
    -- coalesce(last_message_id, opened_after), then by id, puts the chat
    -- with the latest activity first.
    opened_after    REAL NOT NULL,
    -- the search index holds this chat's messages up to this id (a search
    -- indexes the rest of the searcher's chats first)
    indexed_up_to   INTEGER NOT NULL DEFAULT 0,
    -- its messages, kept by every send and deletion: a member's unread
    -- count is message_count - seen_count, so a send changes one row
    message_count   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (user_low, user_high),
    CHECK (type = 'group' OR user_low < user_high)
);

-- Keyed by chat first, so a send updates every member's row on few pages.
CREATE TABLE IF NOT EXISTS chat_members (
    chat_id      INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    joined       INTEGER NOT NULL DEFAULT 0,  -- the order of joining: a leaving owner's heir
    last_read_id INTEGER NOT NULL DEFAULT 0,
    -- the chat's messages the member has seen: those up to last_read_id and
    -- their own; the rest are unread (chats.message_count - seen_count), so
    -- listing chats never counts messages, and a send changes the author's row only
    seen_count   INTEGER NOT NULL DEFAULT 0,
    -- the member's messages in the chat: once they have written, the others
    -- who share it see their email and phone
    posted       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (chat_id, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chat_members_by_user ON chat_members (user_id, chat_id);

-- AUTOINCREMENT: a message's id is never handed out again, also after the
-- newest is deleted, so ids grow with time and clients' cursors hold.
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id     INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    author_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    text        TEXT NOT NULL,
    files       TEXT NOT NULL DEFAULT '[]',  -- the file objects it carries, in the order sent
    -- no foreign key: a reply stays one when the message it answers is deleted
    reply_to_id INTEGER,
    client_id   TEXT,                        -- what the sender's client knows it by
    created_at  TEXT NOT NULL,
    edited_at   TEXT,                        -- null until the text is edited
    reactions   TEXT NOT NULL DEFAULT '{}',  -- {"emoji": [user id, ...], ...}
    -- The message as every answer shows it, written whenever the row is: a
    -- page of history, read far more often than messages are written, then
    -- joins stored text instead of building each object again.
    json        TEXT GENERATED ALWAYS AS (json_object(
                    'id', id, 'chat_id', chat_id, 'author_id', author_id, 'text', text,
                    'files', json(files), 'reply_to_id', reply_to_id, 'client_id', client_id,
                    'created_at', created_at, 'edited_at', edited_at,
                    'reactions', json(reactions))) STORED
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages (chat_id, id);

-- At most one reaction per user per message. messages.reactions holds the
-- same as JSON, written again from here at every change.
CREATE TABLE IF NOT EXISTS reactions (
    message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    emoji      TEXT NOT NULL,
    PRIMARY KEY (message_id, user_id)
) WITHOUT ROWID;

-- An uploaded file: what it is, here, and its bytes in file_contents, so
-- that reading a file's object or a message's never reads its bytes.
-- AUTOINCREMENT: a deleted file's id never names another.
CREATE TABLE IF NOT EXISTS files (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,  -- the uploader
    name         TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    width        INTEGER,                   -- of an image; null for anything else
    height       INTEGER,
    etag         TEXT NOT NULL,             -- from the bytes, which never change
    created_at   TEXT NOT NULL,
    json         TEXT GENERATED ALWAYS AS (json_object(
                     'id', id, 'name', name, 'content_type', content_type, 'size', size,
                     'width', width, 'height', height, 'url', '/files/' || id,
                     'created_at', created_at)) STORED
);
-- A file that no message carries is deleted a day after its upload.
CREATE INDEX IF NOT EXISTS files_by_created_at ON files (created_at);
-- Written and read in chunks (incremental blob I/O), never whole.
CREATE TABLE IF NOT EXISTS file_contents (
    file_id INTEGER PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    data    BLOB NOT NULL
);
-- Which messages carry which files: who may read a file, and when it goes.
CREATE TABLE IF NOT EXISTS message_files (
    file_id    INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    PRIMARY KEY (file_id, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS message_files_by_message ON message_files (message_id);

-- The client_id of each send, for a day: a retry of the send answers the
-- message it made, also after that message was deleted (message_id then
-- names none: no foreign key).
CREATE TABLE IF NOT EXISTS sends (
    chat_id    INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    author_id  INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_id  TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    sent_at    REAL NOT NULL,               -- Unix time
    PRIMARY KEY (chat_id, author_id, client_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sends_by_time ON sends (sent_at);

-- The events of GET /updates. An event of a chat (a message, an edit, a
-- reaction, a rename...) is one row for all its members (user_id NULL),
-- whatever their number, and each member reads it through their spans
-- below; an event for one user (a read mark, a profile, "you were
-- removed") is a row with their user_id. Ids grow with time: old rows are
-- pruned only after new ones are written, so the largest id is never
-- deleted. A row names what it shows (a message, a chat, a user) and the
-- feed shows it as it is when read: an edit shows in the earlier updates
-- too, and a deleted message's updates are left out.
CREATE TABLE IF NOT EXISTS updates (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER,                     -- its one recipient; NULL: the members of chat_id
    chat_id    INTEGER,
    created_at REAL NOT NULL,               -- Unix time, for pruning
    type       TEXT NOT NULL,
    ref        INTEGER,                     -- the message, chat or user it shows; a typist
    payload    TEXT                         -- the rest of the event, small JSON: ids, an emoji
);
CREATE INDEX IF NOT EXISTS updates_by_user ON updates (user_id, id) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS updates_by_chat ON updates (chat_id, id) WHERE user_id IS NULL;

-- The stretches of the feed in which a user was a member of a chat: they
-- read its events with after_id < id <= until_id (NULL: still a member),
-- so each event reaches exactly the members at its time. One who left and
-- came back has two spans. Pruned with the updates they cover.
CREATE TABLE IF NOT EXISTS chat_spans (
    user_id  INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    chat_id  INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    after_id INTEGER NOT NULL,
    until_id INTEGER,
    PRIMARY KEY (user_id, chat_id, after_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chat_spans_by_chat ON chat_spans (chat_id);

PRAGMA user_version = 4;

-- upgrades
-- Each step brings a database from the version before it to its own.

-- upgrade to 2: keys are NFC-normalised (fold() is messenger.py's, given to
-- every connection), username searches read ё as е, chats may be groups,
-- and messages may be edited, deleted and reacted to.
DROP TRIGGER IF EXISTS users_search_insert;
DROP TRIGGER IF EXISTS users_search_delete;
DROP TRIGGER IF EXISTS users_search_update;
DROP TABLE IF EXISTS users_search;
-- OR IGNORE: two users whose keys differed only in normalisation keep theirs.
UPDATE OR IGNORE users SET email_key = fold(email);
UPDATE OR IGNORE users SET username_key = fold(username);
ALTER TABLE users ADD COLUMN
    search_key TEXT GENERATED ALWAYS AS (replace(username_key, 'ё', 'е')) VIRTUAL;
CREATE INDEX IF NOT EXISTS users_by_search_key ON users (search_key, username_key);
-- Chats become dialogs or groups; members remember when they joined;
-- messages gain edited_at, reactions, their stored JSON and ids that are
-- never reused. New tables, since SQLite changes constraints and adds
-- stored columns only in a table it creates.
CREATE TABLE chats_2 (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    type            TEXT NOT NULL CHECK (type IN ('dialog', 'group')),
    user_low        INTEGER REFERENCES users (id) ON DELETE CASCADE,
    user_high       INTEGER REFERENCES users (id) ON DELETE CASCADE,
    name            TEXT NOT NULL DEFAULT '',
    owner_id        INTEGER REFERENCES users (id) ON DELETE SET NULL,
    created_at      TEXT NOT NULL,
    last_message_id INTEGER,
    opened_after    REAL NOT NULL,
    UNIQUE (user_low, user_high),
    CHECK (type = 'group' OR user_low < user_high)
);
INSERT INTO chats_2 (id, type, user_low, user_high, created_at, last_message_id, opened_after)
    SELECT id, 'dialog', user_low, user_high, created_at, last_message_id, opened_after FROM chats;
DROP TABLE chats;
ALTER TABLE chats_2 RENAME TO chats;
ALTER TABLE chat_members ADD COLUMN joined INTEGER NOT NULL DEFAULT 0;
CREATE TABLE messages_2 (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id    INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    author_id  INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    text       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    edited_at  TEXT,
    reactions  TEXT NOT NULL DEFAULT '{}',
    json       TEXT GENERATED ALWAYS AS (json_object(
                   'id', id, 'chat_id', chat_id, 'author_id', author_id, 'text', text,
                   'created_at', created_at, 'edited_at', edited_at,
                   'reactions', json(reactions))) STORED
);
INSERT INTO messages_2 (id, chat_id, author_id, text, created_at)
    SELECT id, chat_id, author_id, text, created_at FROM messages;
DROP TABLE messages;
ALTER TABLE messages_2 RENAME TO messages;
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages (chat_id, id);
CREATE TABLE IF NOT EXISTS reactions (
    message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    emoji      TEXT NOT NULL,
    PRIMARY KEY (message_id, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS search_progress (indexed_up_to INTEGER NOT NULL);
INSERT INTO search_progress (indexed_up_to) VALUES (0);
-- Updates written by version 1 hold chats and messages of the old shape:
-- clients read their chats again after the upgrade.
DELETE FROM updates;
PRAGMA user_version = 2;

-- upgrade to 3: user search matches words of names too; message search
-- indexes each chat's words apart, so that a search reads only the
-- searcher's chats; members count their own messages (who sees whose
-- email and phone); updates name what they show instead of copying it.
-- search_words() is messenger.py's, given to every connection.
ALTER TABLE users ADD COLUMN name_key TEXT NOT NULL DEFAULT '';
UPDATE users SET name_key = search_words(name);
ALTER TABLE chats ADD COLUMN indexed_up_to INTEGER NOT NULL DEFAULT 0;
ALTER TABLE chat_members ADD COLUMN posted INTEGER NOT NULL DEFAULT 0;
UPDATE chat_members SET posted = (SELECT count(*) FROM messages
    WHERE chat_id = chat_members.chat_id AND author_id = chat_members.user_id);
DROP TABLE IF EXISTS search_progress;
DROP TABLE IF EXISTS messages_search;  -- made again below, and filled by the next searches
-- Pending updates of version 2 hold copies: clients read their chats again.
DROP TABLE updates;
CREATE TABLE updates (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    type       TEXT NOT NULL,
    ref        INTEGER,
    payload    TEXT
);
CREATE INDEX IF NOT EXISTS updates_by_user ON updates (user_id, id);
PRAGMA user_version = 3;

-- upgrade to 4: messages carry files, replies and their sender's client_id;
-- files are stored; sends remember their client_id for a day. The stored
-- JSON of messages changes, so the table is made again. A chat's events are
-- stored once for all its members, and unread counts follow from counts.
CREATE TABLE messages_4 (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id     INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    author_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    text        TEXT NOT NULL,
    files       TEXT NOT NULL DEFAULT '[]',
    reply_to_id INTEGER,
    client_id   TEXT,
    created_at  TEXT NOT NULL,
    edited_at   TEXT,
    reactions   TEXT NOT NULL DEFAULT '{}',
    json        TEXT GENERATED ALWAYS AS (json_object(
                    'id', id, 'chat_id', chat_id, 'author_id', author_id, 'text', text,
                    'files', json(files), 'reply_to_id', reply_to_id, 'client_id', client_id,
                    'created_at', created_at, 'edited_at', edited_at,
                    'reactions', json(reactions))) STORED
);
INSERT INTO messages_4 (id, chat_id, author_id, text, created_at, edited_at, reactions)
    SELECT id, chat_id, author_id, text, created_at, edited_at, reactions FROM messages;
DROP TABLE messages;
ALTER TABLE messages_4 RENAME TO messages;
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages (chat_id, id);
-- Unread counts become message_count - seen_count.
ALTER TABLE chats ADD COLUMN message_count INTEGER NOT NULL DEFAULT 0;
UPDATE chats SET message_count = (SELECT count(*) FROM messages WHERE chat_id = chats.id);
ALTER TABLE chat_members ADD COLUMN seen_count INTEGER NOT NULL DEFAULT 0;
UPDATE chat_members SET seen_count = (SELECT message_count FROM chats WHERE id = chat_id) - unread_count;
ALTER TABLE chat_members DROP COLUMN unread_count;
-- A chat's events become one row for all its members; the rows pending for
-- one user each stay, and every member's span starts now.
DROP INDEX updates_by_user;
ALTER TABLE updates RENAME TO updates_3;
CREATE TABLE updates (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER,
    chat_id    INTEGER,
    created_at REAL NOT NULL,
    type       TEXT NOT NULL,
    ref        INTEGER,
    payload    TEXT
);
INSERT INTO updates (id, user_id, created_at, type, ref, payload)
    SELECT id, user_id, created_at, type, ref, payload FROM updates_3;
DROP TABLE updates_3;
CREATE INDEX IF NOT EXISTS updates_by_user ON updates (user_id, id) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS updates_by_chat ON updates (chat_id, id) WHERE user_id IS NULL;
CREATE TABLE IF NOT EXISTS chat_spans (
    user_id  INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    chat_id  INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    after_id INTEGER NOT NULL,
    until_id INTEGER,
    PRIMARY KEY (user_id, chat_id, after_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chat_spans_by_chat ON chat_spans (chat_id);
INSERT INTO chat_spans (user_id, chat_id, after_id)
    SELECT user_id, chat_id, (SELECT coalesce(max(id), 0) FROM updates) FROM chat_members;

-- An uploaded file: what it is, here, and its bytes in file_contents, so
-- that reading a file's object or a message's never reads its bytes.
-- AUTOINCREMENT: a deleted file's id never names another.
CREATE TABLE IF NOT EXISTS files (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,  -- the uploader
    name         TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    width        INTEGER,                   -- of an image; null for anything else
    height       INTEGER,
    etag         TEXT NOT NULL,             -- from the bytes, which never change
    created_at   TEXT NOT NULL,
    json         TEXT GENERATED ALWAYS AS (json_object(
                     'id', id, 'name', name, 'content_type', content_type, 'size', size,
                     'width', width, 'height', height, 'url', '/files/' || id,
                     'created_at', created_at)) STORED
);
-- A file that no message carries is deleted a day after its upload.
CREATE INDEX IF NOT EXISTS files_by_created_at ON files (created_at);
-- Written and read in chunks (incremental blob I/O), never whole.
CREATE TABLE IF NOT EXISTS file_contents (
    file_id INTEGER PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    data    BLOB NOT NULL
);
-- Which messages carry which files: who may read a file, and when it goes.
CREATE TABLE IF NOT EXISTS message_files (
    file_id    INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    PRIMARY KEY (file_id, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS message_files_by_message ON message_files (message_id);

-- The client_id of each send, for a day: a retry of the send answers the
-- message it made, also after that message was deleted (message_id then
-- names none: no foreign key).
CREATE TABLE IF NOT EXISTS sends (
    chat_id    INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    author_id  INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_id  TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    sent_at    REAL NOT NULL,               -- Unix time
    PRIMARY KEY (chat_id, author_id, client_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sends_by_time ON sends (sent_at);
PRAGMA user_version = 4;

-- search-index
-- What follows runs only where SQLite has FTS5 (3.34+ for trigrams); where
-- it has not, the part after "-- no-search-index" runs instead.
--
-- Every three-character piece of each user's search key, so a username
-- search of 3+ characters finds its matches without reading every user;
-- shorter searches scan with instr().
CREATE VIRTUAL TABLE IF NOT EXISTS users_search USING fts5 (
    search_key, content = 'users', content_rowid = 'id', tokenize = 'trigram case_sensitive 1'
);
CREATE TRIGGER IF NOT EXISTS users_search_insert AFTER INSERT ON users BEGIN
    INSERT INTO users_search (rowid, search_key) VALUES (new.id, new.search_key);
END;
CREATE TRIGGER IF NOT EXISTS users_search_delete AFTER DELETE ON users BEGIN
    INSERT INTO users_search (users_search, rowid, search_key)
    VALUES ('delete', old.id, old.search_key);
END;
CREATE TRIGGER IF NOT EXISTS users_search_update AFTER UPDATE OF username_key ON users BEGIN
    INSERT INTO users_search (users_search, rowid, search_key)
    VALUES ('delete', old.id, old.search_key);
    INSERT INTO users_search (rowid, search_key) VALUES (new.id, new.search_key);
END;
-- Index the users already there (after an upgrade; on a new database, none).
INSERT INTO users_search (users_search) VALUES ('rebuild');

-- The words of each user's name, so a search finds the names with a word
-- that starts with it ("борис"*).
CREATE VIRTUAL TABLE IF NOT EXISTS users_names USING fts5 (
    name_key, content = 'users', content_rowid = 'id',
    tokenize = "unicode61 remove_diacritics 0 categories 'L* N* Co M*'"
);
CREATE TRIGGER IF NOT EXISTS users_names_insert AFTER INSERT ON users BEGIN
    INSERT INTO users_names (rowid, name_key) VALUES (new.id, new.name_key);
END;
CREATE TRIGGER IF NOT EXISTS users_names_delete AFTER DELETE ON users BEGIN
    INSERT INTO users_names (users_names, rowid, name_key) VALUES ('delete', old.id, old.name_key);
END;
CREATE TRIGGER IF NOT EXISTS users_names_update AFTER UPDATE OF name_key ON users BEGIN
    INSERT INTO users_names (users_names, rowid, name_key) VALUES ('delete', old.id, old.name_key);
    INSERT INTO users_names (rowid, name_key) VALUES (new.id, new.name_key);
END;
INSERT INTO users_names (users_names) VALUES ('rebuild');

-- The words of each message, for GET /messages, as messenger.py writes
-- them: folded, ё read as е, each prefixed with its chat's id and "x"
-- ("12xпривет"), so that a search for "12xприв"* reads only chat 12's
-- words, never those of chats the searcher is not in. Messages are indexed
-- in batches, when someone searches (chats.indexed_up_to): FTS5 writes a
-- new segment at every commit, which made a send half as dear again.
CREATE VIRTUAL TABLE IF NOT EXISTS messages_search USING fts5 (
    words, chat_id UNINDEXED, tokenize = "unicode61 remove_diacritics 0 categories 'L* N* Co M*'"
);

-- no-search-index
-- Where SQLite has no FTS5, the same words are kept in a plain table, by
-- chat, and a search reads all of the searcher's chats; names are searched
-- with instr().
CREATE TABLE IF NOT EXISTS messages_search (
    rowid   INTEGER PRIMARY KEY,
    words   TEXT NOT NULL,
    chat_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_search_by_chat ON messages_search (chat_id, rowid);
