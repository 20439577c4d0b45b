# Third-party dependencies, all from Debian -dev packages (see Makefile: deps-apt).
find_package(Threads REQUIRED)
find_package(SQLite3 REQUIRED)

find_path(XXHASH_INCLUDE_DIR xxhash.h REQUIRED)
find_library(XXHASH_LIBRARY NAMES xxhash REQUIRED)
add_library(kvagent_xxhash INTERFACE)
target_include_directories(kvagent_xxhash INTERFACE $<BUILD_INTERFACE:${XXHASH_INCLUDE_DIR}>)
target_link_libraries(kvagent_xxhash INTERFACE $<BUILD_INTERFACE:${XXHASH_LIBRARY}>)
# CMake >= 4.1 names the imported target SQLite3::SQLite3 (older: SQLite::SQLite3).
if(TARGET SQLite3::SQLite3)
  set(KVAGENT_SQLITE_TARGET SQLite3::SQLite3)
else()
  set(KVAGENT_SQLITE_TARGET SQLite::SQLite3)
endif()
