# Third-party dependencies, all from Debian -dev packages (see Makefile: deps-apt).
find_package(Threads REQUIRED)
find_package(SQLite3 REQUIRED)

find_path(XXHASH_INCLUDE_DIR xxhash.h REQUIRED)
find_library(XXHASH_LIBRARY NAMES xxhash REQUIRED)
add_library(kvagent_xxhash INTERFACE)
target_include_directories(kvagent_xxhash INTERFACE $<BUILD_INTERFACE:${XXHASH_INCLUDE_DIR}>)
target_link_libraries(kvagent_xxhash INTERFACE $<BUILD_INTERFACE:${XXHASH_LIBRARY}>)
# hiredis (Debian libhiredis-dev): the remote (Redis) tier's client.
find_path(HIREDIS_INCLUDE_DIR hiredis/hiredis.h REQUIRED)
find_library(HIREDIS_LIBRARY NAMES hiredis REQUIRED)
# CMake >= 4.1 names the imported target SQLite3::SQLite3 (older: SQLite::SQLite3).
if(TARGET SQLite3::SQLite3)
  set(KVAGENT_SQLITE_TARGET SQLite3::SQLite3)
else()
  set(KVAGENT_SQLITE_TARGET SQLite::SQLite3)
endif()

# io_uring (Debian liburing-dev), linked statically so nothing extra is needed at run time: lets
# the disk tier keep several direct-I/O writes in flight. Without it those writes are synchronous.
set(KVAGENT_URING "AUTO" CACHE STRING "Asynchronous direct writes through io_uring: ON, OFF or AUTO")
set(KVAGENT_HAVE_URING OFF)
if(NOT KVAGENT_URING STREQUAL "OFF")
  find_path(URING_INCLUDE_DIR liburing.h)
  find_library(URING_LIBRARY NAMES liburing.a uring)
  if(URING_INCLUDE_DIR AND URING_LIBRARY)
    set(KVAGENT_HAVE_URING ON)
  elseif(KVAGENT_URING STREQUAL "ON")
    message(FATAL_ERROR "KVAGENT_URING=ON but liburing (liburing-dev) was not found")
  else()
    message(STATUS "liburing not found: disk tier direct writes are synchronous")
  endif()
endif()
